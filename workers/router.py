"""Where a runner publishes each message and which streams it reads.

The default router keeps DESIGN.md's plain layout: one stream per stateless stage (its
instances pull, which is join-the-shortest-queue for free) and hashed partitions for
aggregating stages. Scheduling policies for LM stages (orchestrator/scheduling.py)
replace it to place work on per-instance streams; both sides of the decision —
publishing and consuming — go through this one object so they cannot disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.envelope import Envelope
from orchestrator.routing import stage_streams, stream_for
from orchestrator.spec import PipelineSpec

if TYPE_CHECKING:
    from workers.runner import StageRunner


class Router:
    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    def stream_for(self, env: Envelope) -> str:
        """The stream to publish `env` on (called by the producing runner)."""
        return stream_for(self.spec, env)

    def all_streams(self, stage: str) -> list[str]:
        """Every stream the stage's consumer group must exist on."""
        return stage_streams(self.spec, stage)

    def consume_streams(self, runner: StageRunner) -> list[str]:
        """Streams this instance reads now, in order of preference."""
        return runner.owned

    async def refresh(self, runner: StageRunner) -> None:
        """Periodic hook (every heartbeat): pull placement/statistics from the transport."""

    def observe(self, event: str, data: dict[str, object]) -> None:
        """Statistics hook: the runner reports each finished call here too."""
