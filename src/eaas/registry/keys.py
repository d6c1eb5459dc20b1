"""Every Redis key EaaS uses, built in one place.

Keys follow ``{prefix}:{kind}:{id}[:{sub}]`` (prefix ``eaas`` by default, see
``EAAS_PREFIX``), except the index sets and the events channel, which are
``{prefix}:{kind}s`` (no id). Types and TTLs:

============================  ======  ===========  ==========================================
key                           type    TTL          holds
============================  ======  ===========  ==========================================
``models``                    SET     none         names of registered models
``model:{name}``              HASH    none         ``spec`` (ModelSpec JSON), ``registered_at``
``model:{name}:functions``    SET     none         function ids of the model
``function:{fid}``            HASH    none         ``spec`` (FunctionSpec JSON), ``model``
``function:{fid}:replicas``   SET     none         ids of workers hosting the function
``workers``                   SET     none         index of worker ids (cleaned by the reaper)
``worker:{id}``               HASH    lease TTL    the worker record; expiry = worker gone
``worker:{id}:shard``         SET     none         function ids the worker hosts
``worker:{id}:extra``         SET     none         extra replicas the autoscaler wants it to host
``events``                    pubsub  -            membership events (JSON)
============================  ======  ===========  ==========================================

Function ids are ``{model}/{layer}/{expert}``; they may contain ``/`` but never
``:`` (model names are validated to exclude it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from eaas.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,199}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")

KEY_PATTERN = re.compile(
    r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9._\-]{0,63})"
    r":(?P<kind>models|workers|events|model|function|worker)"
    r"(?::(?P<id>[A-Za-z0-9][A-Za-z0-9._/\-]{0,199}))?"
    r"(?::(?P<sub>functions|replicas|shard|extra))?$"
)
"""Every key built by :class:`Keys` matches this pattern (checked by a test)."""


def check_name(kind: str, name: str) -> str:
    """Validate a model/worker/function id used inside a key.

    Raises:
        ConfigError: the name is empty, too long, or has characters outside
            ``[A-Za-z0-9._/-]`` (``:`` would break the key layout).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid {kind} id {name!r}: use 1-200 characters from [A-Za-z0-9._/-], starting alphanumeric"
        )
    return name


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one deployment prefix."""

    prefix: str = "eaas"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(f"invalid key prefix {self.prefix!r}: use [A-Za-z0-9._-], at most 64 characters")

    # index sets and channel
    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    # per-entity keys
    def model(self, name: str) -> str:
        return f"{self.prefix}:model:{check_name('model', name)}"

    def model_functions(self, name: str) -> str:
        return f"{self.model(name)}:functions"

    def function(self, fid: str) -> str:
        return f"{self.prefix}:function:{check_name('function', fid)}"

    def function_replicas(self, fid: str) -> str:
        return f"{self.function(fid)}:replicas"

    def worker(self, wid: str) -> str:
        return f"{self.prefix}:worker:{check_name('worker', wid)}"

    def worker_shard(self, wid: str) -> str:
        return f"{self.worker(wid)}:shard"

    def worker_extra(self, wid: str) -> str:
        return f"{self.worker(wid)}:extra"
