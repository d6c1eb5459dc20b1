"""One error hierarchy for the whole project.

Every error EaaS raises on purpose derives from :class:`EaaSError`. The gateway
maps these classes to HTTP statuses in one place (``eaas.gateway.errors``); the
CLI prints ``str(error)`` on one line and exits non-zero.
"""

from __future__ import annotations


class EaaSError(Exception):
    """Base class of every error EaaS raises on purpose."""


class ConfigError(EaaSError):
    """A setting or a command-line value is invalid."""


# --- registry -----------------------------------------------------------------


class RegistryError(EaaSError):
    """The registry (Redis) refused an operation or holds inconsistent data."""


class RegistryUnavailable(RegistryError):
    """Redis cannot be reached, or refused our credentials."""


class NotFound(RegistryError):
    """A model, function or worker id is not in the registry."""


class DeploymentNotFound(RegistryError):
    """No running deployment was found (no ``EAAS_REDIS_URL`` and no state file)."""


# --- functions / checkpoints --------------------------------------------------


class CheckpointError(EaaSError):
    """A checkpoint directory is missing, truncated or inconsistent with its config."""


class UnsupportedArchitecture(CheckpointError):
    """The checkpoint's architecture has no expert-function family in EaaS."""


# --- platform -----------------------------------------------------------------


class ProtocolError(EaaSError):
    """A wire message is malformed or violates a limit.

    Attributes:
        code: short machine-readable reason (``"bad_header"``, ``"too_large"``, ...),
            carried in error replies.
    """

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class TransportError(EaaSError):
    """A data-plane transport cannot carry a tensor (arena full, peer gone, ...)."""


class RemoteError(EaaSError):
    """A worker answered a request with an error reply.

    Attributes:
        code: the worker's error code (see :class:`ProtocolError`).
    """

    def __init__(self, message: str, code: str = "remote_error") -> None:
        super().__init__(message)
        self.code = code


class NoReplicaAvailable(EaaSError):
    """No ready replica could serve some functions before the call's deadline.

    Attributes:
        functions: the function ids that had no replica.
    """

    def __init__(self, functions: list[str] | tuple[str, ...], detail: str = "") -> None:
        shown = ", ".join(list(functions)[:8]) + (" ..." if len(functions) > 8 else "")
        msg = f"no ready replica for {len(functions)} function(s): {shown}"
        super().__init__(msg + (f" ({detail})" if detail else ""))
        self.functions = tuple(functions)


class Cancelled(EaaSError):
    """The caller gave up on the work (its HTTP client disconnected) before it ran."""


class ExpertComputeError(EaaSError):
    """An expert worker failed computing a request (a server fault, never the caller's).

    Attributes:
        code: ``"internal"``, the wire code of its error reply (retryable on another replica).
    """

    code = "internal"


class ExpertTimeout(EaaSError):
    """An expert call did not complete before its deadline."""


# --- expert functions -----------------------------------------------------------


class InvalidSpec(EaaSError):
    """A model or function spec (or its JSON form) is malformed."""


class InvalidFunctionId(InvalidSpec):
    """A function id is not of the form ``{model}/{layer}/{expert}``."""


class UnknownFunction(EaaSError):
    """An expert function was asked of a shard that does not host it."""


class ShardInputError(EaaSError):
    """An expert shard's input (shape, dtype, device, segments) does not match the shard."""


# --- gateway ----------------------------------------------------------------------


class NonFiniteLogits(EaaSError):
    """The model produced NaN or infinite logits for a sequence (a server-side fault).

    Only that sequence ends (HTTP 500 / a final SSE error event); the runner goes on.
    """


class Overloaded(EaaSError):
    """The gateway's waiting queue is full; the request was refused, not queued (HTTP 429).

    Attributes:
        retry_after_s: seconds after which a retry is reasonable.
    """

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
