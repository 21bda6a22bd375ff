"""A pipeline's state as the transport holds it: per stage its live instances and queue
(entries kept, delivered but unacknowledged, not yet delivered), and its unresolved dead
letters. One reading for `/metrics` (the gateway's gauges) and `alto status` (an operator
at a terminal), so the two never disagree."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestrator.embedded import NoGroupError
from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import PipelineSpec
from orchestrator.transport import Transport
from workers import deadletters


@dataclass(frozen=True, slots=True)
class StageStatus:
    stage: str
    instances: int
    length: int  # entries kept in the stage's streams
    pending: int  # delivered, not yet acknowledged (being worked on)
    lag: int  # not yet delivered (waiting for a free instance)


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    pipeline: str
    stages: list[StageStatus]
    dead_letters: int


async def queue_depth(transport: Transport, spec: PipelineSpec, stage: str) -> tuple[int, int, int]:
    """(kept, pending, lag) summed over the stage's streams. A stream no instance has read
    yet has no consumer group: everything in it waits (what waits for a stage whose workers
    never came is counted, not hidden), and looking creates nothing."""
    group = stage_group(spec.name, stage)
    length = pending = lag = 0
    for stream in stage_streams(spec, stage):
        try:
            st = await transport.stats(stream, group)
        except NoGroupError:
            waiting = await transport.length(stream)
            length += waiting
            lag += waiting
            continue
        length += st.length
        pending += st.pending
        lag += st.lag
    return length, pending, lag


async def pipeline_status(transport: Transport, spec: PipelineSpec) -> PipelineStatus:
    stages = []
    for stage in spec.topo_order:
        depth = await queue_depth(transport, spec, stage)
        instances = len(await transport.members(stage_group(spec.name, stage)))
        stages.append(StageStatus(stage, instances, *depth))
    return PipelineStatus(spec.name, stages, await deadletters.count(transport, spec.name))


async def missing_stages(transport: Transport, spec: PipelineSpec,
                         live: Callable[[str], Awaitable[int]] | None = None) -> list[str]:
    """Stages of `spec` with no live instance (heartbeat) right now: a run started then
    would wait for nothing (the gateway answers 503 no_workers, `alto run` exits). `live`
    counts a stage group's instances (the gateway's is cached); default: its members."""
    async def members(group: str) -> int:
        return len(await transport.members(group))

    count = live or members
    return [stage for stage in spec.topo_order
            if await count(stage_group(spec.name, stage)) == 0]
