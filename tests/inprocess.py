"""A pipeline run in the test's own process: a Runtime hosting every stage on the test's
transport, started before the runs and stopped after them (also when one fails)."""

from __future__ import annotations

from typing import Any

from orchestrator.spec import PipelineSpec
from orchestrator.transport import Transport
from workers.client import run_to_completion
from workers.runner import RunnerConfig
from workers.runtime import Runtime

FAST = RunnerConfig(block_ms=20, heartbeat_ms=50)  # short waits: tests end sooner


async def run_texts(transport: Transport, spec: PipelineSpec, *texts: str,
                    config: RunnerConfig = FAST,
                    deadline_s: float = 30.0) -> tuple[list[list[dict[str, Any]]], Runtime]:
    """Each text as one run, in order: the events of each (the last is `result` or
    `error`), and the stopped runtime (its engines and runners, for assertions)."""
    rt = Runtime(transport, [spec], config=config)
    await rt.start()
    try:
        runs = [(await run_to_completion(transport, spec, t, deadline_s=deadline_s))[1]
                for t in texts]
    finally:
        await rt.stop()
    return runs, rt
