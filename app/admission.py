"""Admission checks a run must pass before it is published, besides the in-flight slot
(app/gateway.py): bounded stage queues, a bounded prompt, a bounded deadline, and the
ownership rule that decides who may read a run.

Why queue bounds at the gateway: workers pull at their own pace, so an overloaded stage
shows up as entries waiting in its stream (Redis memory) that will mostly miss their
deadline anyway; refusing new runs with 429 + Retry-After while a stage's backlog is at
its bound keeps memory bounded and tells clients to back off.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import Request

from app.errors import ApiError
from app.metrics import Metrics
from orchestrator.routing import stage_group
from orchestrator.spec import PipelineSpec
from orchestrator.template import is_blank
from orchestrator.transport import Transport
from workers.settings import Settings
from workers.status import queue_depth


class QueueGuard:
    """Per-stage backlog bounds (`max_queue`, `max_queue_stages`), read through a short
    cache (`queue_stats_cache_s`) so admission does not cost a round trip per request."""

    def __init__(self, settings: Settings, transport: Transport, metrics: Metrics) -> None:
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self._cache: dict[str, tuple[float, int]] = {}

    def bound(self, spec: PipelineSpec, stage: str) -> int:
        """`pipeline.stage` override, else `stage` override, else `max_queue` (0 = none)."""
        bounds = self.settings.max_queue_stages
        return int(bounds.get(f"{spec.name}.{stage}", bounds.get(stage, self.settings.max_queue)))

    async def backlog(self, spec: PipelineSpec, stage: str) -> int:
        """Entries queued for `stage` and not yet delivered to any of its instances."""
        group = stage_group(spec.name, stage)
        hit = self._cache.get(group)
        if hit is not None and time.monotonic() - hit[0] < self.settings.queue_stats_cache_s:
            return hit[1]
        _, _, lag = await queue_depth(self.transport, spec, stage)
        self._cache[group] = (time.monotonic(), lag)
        return lag

    async def check(self, spec: PipelineSpec) -> None:
        """429 `queue_full` while some stage of `spec` holds at least its bound."""
        for stage in spec.topo_order:
            bound = self.bound(spec, stage)
            if bound <= 0:
                continue
            backlog = await self.backlog(spec, stage)
            if backlog >= bound:
                self.metrics.rejected.inc()
                raise ApiError(
                    429,
                    f"stage {stage!r} of pipeline {spec.name!r} has {backlog} queued "
                    f"entries (its bound is {bound}); retry later",
                    code="queue_full",
                    retry_after_s=self.settings.retry_after_s,
                )


def check_prompt(settings: Settings, text: str, param: str) -> None:
    """400 `context_length_exceeded` (OpenAI's code) naming the field, for an input over
    `max_prompt_chars` characters (0 = no limit besides the body size)."""
    limit = settings.max_prompt_chars
    if limit > 0 and len(text) > limit:
        raise ApiError(
            400,
            f"the input is {len(text)} characters long; this gateway accepts at most {limit}: "
            f"shorten {param!r}",
            code="context_length_exceeded",
            param=param,
        )


def check_input(spec: PipelineSpec, text: str, param: str) -> None:
    """400 `empty_input` naming the field, for a blank input to a pipeline that needs one
    (`input_required`)."""
    if spec.input_required and is_blank(text):
        raise ApiError(400, f"pipeline {spec.name!r} needs an input: {param!r} holds no text",
                       code="empty_input", param=param)


DEADLINE_HEADER = "X-Alto-Deadline"


def deadline_for(settings: Settings, request: Request) -> float:
    """The deadline of a new run: `X-Alto-Deadline` seconds when sent (in (0, max]),
    else `run_deadline_s`.

    Read from the request rather than declared as an OpenAPI parameter: the document
    cannot state the configured maximum, and API fuzzers would send tiny deadlines and
    then count the 504s they cause as server errors. docs/API.md documents it."""
    header = request.headers.get(DEADLINE_HEADER, "").strip()
    if not header:
        return settings.run_deadline_s
    limit = settings.max_run_deadline_s
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not 0 < value <= limit:  # also refuses nan and inf
        raise ApiError(400, f"{DEADLINE_HEADER} must be a number of seconds in (0, {limit:g}]",
                       code="invalid_value", param=DEADLINE_HEADER)
    return value


def same_owner(recorded: Any, caller: str | None) -> bool:
    """A run is readable with the key that created it (its hash is recorded); a run
    created while no keys were configured, by anyone."""
    if recorded is None:
        return True
    return caller is not None and hmac.compare_digest(str(recorded), caller)
