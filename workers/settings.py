"""Process configuration: environment variables `ALTO_*` (or a .env file) via pydantic-settings.

Command-line flags override these; the pipeline spec's own `engines:` section is the
default that `ALTO_ENGINE` (and friends) override for every LM stage at once.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def reveal(value: SecretStr | str | None) -> str | None:
    """The plain text of a secret setting, for the one place that must use it (a connection,
    a key comparison). Also takes a plain str, since `model_copy(update=...)` skips validation."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class Settings(BaseSettings):
    """Secrets (`redis_url`, which may hold a password, `api_keys`, `openai_api_key`) are
    `SecretStr`, so printing or logging the settings object, or a validation error about it,
    shows `**********`; use sites call `reveal()`."""

    # hide_input_in_errors: a malformed ALTO_API_KEYS would otherwise be echoed in the error
    model_config = SettingsConfigDict(
        env_prefix="ALTO_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    redis_url: SecretStr | None = None
    pipelines: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["examples/factool/pipeline.yaml"]
    )
    engine: str | None = None  # override the engine kind of every LM stage (sim|local|openai|vllm)
    engine_options: dict[str, object] = Field(default_factory=dict)
    instances: int | None = None
    concurrency: int | None = None
    claim_idle_ms: int = 30_000
    lease_ttl_ms: int = 5_000
    heartbeat_ms: int = 1_000
    # an input delivered more often than this (it keeps killing its worker) is dead-lettered
    max_deliveries: int = 5
    trim_interval_ms: int = 5_000  # how often workers trim the streams they read
    # scheduling policy of LM stages, overriding the spec's `policy:` fields: one of
    # pull|round_robin|least_loaded|cache_aware|prompt_aware for every LM stage, or
    # "stage=policy,..." per stage (orchestrator/scheduling.py); every process of a
    # deployment (gateway and workers) must see the same value
    policy: str | None = None
    run_ttl_s: int = 3_600
    run_deadline_s: float = 300.0
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # keys that may also use the operator endpoints (dead letters: app/routes_admin.py);
    # they are API keys too. With API keys but no admin key, those endpoints answer 403
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    max_inflight_runs: int = 256
    # GET /v1/runs/{id}/events streams open at once (each holds a bus connection in a
    # blocking read); more get 429 too_many_viewers. A run's own stream is not one of them
    max_run_viewers: int = 256
    max_body_bytes: int = 1_000_000
    retry_after_s: int = 1
    # gateway security and admission (app/ratelimit.py, app/gateway.py; docs/API.md):
    # per-key token bucket (0 = off; burst 0 = max(1, rate)); a request's own deadline
    # (X-Alto-Deadline) may not exceed max_run_deadline_s; max_queue bounds every stage's
    # backlog of undelivered entries (0 = off), max_queue_stages overrides it per stage
    # ("stage" or "pipeline.stage" -> bound); the backlog is read at most every
    # queue_stats_cache_s; prompts (chat messages, prompt, run input) over
    # max_prompt_chars characters get 400 context_length_exceeded
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 0
    max_run_deadline_s: float = 3_600.0
    max_queue: int = 0
    max_queue_stages: dict[str, int] = Field(default_factory=dict)
    queue_stats_cache_s: float = 0.2
    max_prompt_chars: int = 200_000
    host: str = "127.0.0.1"
    # a TCP port, or 0 (the gateway: any free one; metrics_port: off); out of range, uvicorn
    # reports listening on a port it cannot bind, so the mistake is refused here
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    # deployment (helm/alto, Dockerfile): `alto worker` serves /metrics, /healthz, /readyz
    # on metrics_port (0 = off; workers/metrics.py); log_format json = one JSON object per
    # record with run id and stage (app/logs.py), what log collectors in Kubernetes parse
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    log_format: Literal["text", "json"] = "text"
    # gateway (app/): a native SSE run whose client went away is cancelled after this many
    # seconds unless a client resumes it (GET /v1/runs/{id}/events); OpenAI endpoints cancel
    # at once, since their clients cannot resume
    resume_grace_s: float = 10.0
    sse_ping_s: float = 15.0  # SSE keep-alive comment interval

    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None

    @field_validator("pipelines", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        """Accept a JSON list or a comma-separated string (what people type in env vars)."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [x.strip() for x in v.split(",") if x.strip()]
        return v


def get_settings() -> Settings:
    return Settings()
