"""The engines a command's runtime will build, checked before it starts.

Why: `Runtime.start` builds its engines only once the command is under way (inside
uvicorn's lifespan for `alto serve`, inside the run for `alto run`, once connected to
Redis for `alto worker`), where a wrong option became uvicorn's 40-line "Application
startup failed" traceback or a runtime failure (exit 1). Building an engine only
constructs it (`build_engine` validates the options and reads the environment; `start()`
is what connects or loads weights), so every engine the runtime would build is built here
the same way, then closed, and the first problem is raised with the engine named.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Container, Iterable
from dataclasses import dataclass

from orchestrator.engine import Engine
from orchestrator.spec import EngineSpec, PipelineSpec


class EngineProblem(Exception):
    """An engine that cannot be built. `usage`: a wrong option or setting (the same
    everywhere, exit 2); else what this machine lacks (an optional dependency)."""

    def __init__(self, pipeline: str, engine: str | None, message: str, *,
                 usage: bool) -> None:
        super().__init__(message)
        self.pipeline = pipeline
        self.engine = engine  # its name in the pipeline's `engines:`; None: the override
        self.message = message
        self.usage = usage


@dataclass(frozen=True)
class PlannedEngine:
    """One engine instance the runtime would build: `key` and `index` as the runtime keys
    its engines (the override is one engine whatever the pipeline)."""

    key: str
    index: int
    pipeline: str
    engine: str | None  # None: the override
    spec: EngineSpec
    count: int = 1  # how many instances of it the runtime runs


def planned_engines(specs: Iterable[PipelineSpec], override: EngineSpec | None,
                    instances: int | None,
                    only: Container[tuple[str, str]] | None = None) -> list[PlannedEngine]:
    """What `Runtime.start` builds for every LM stage of `specs` (or for the stages `only`
    names as (pipeline, stage), as `Runtime.start(only)` does: an `alto worker`'s one
    stage), each instance once. Raises EngineProblem where the instance count itself is
    wrong (a fleet too large)."""
    from workers.engines import default_instances
    from workers.runtime import stage_engine

    planned: dict[tuple[str, int], PlannedEngine] = {}
    for spec in specs:
        for stage in (spec.stage(n) for n in spec.topo_order):  # the runtime's order
            if stage.kind != "lm" or (only is not None and (spec.name, stage.name) not in only):
                continue
            name = None if override is not None else stage.engine or "default"
            key, espec = stage_engine(spec, stage.name, override)
            try:
                count = instances or default_instances(espec)
            except ValueError as exc:
                raise EngineProblem(spec.name, name, str(exc), usage=True) from None
            for i in range(count):
                planned.setdefault((key, i), PlannedEngine(key, i, spec.name, name, espec,
                                                           count))
    return list(planned.values())


def check_engines(specs: Iterable[PipelineSpec], override: EngineSpec | None,
                  instances: int | None,
                  only: Container[tuple[str, str]] | None = None) -> None:
    """Build every engine `planned_engines` lists without starting any, close them all,
    and raise EngineProblem for the first that cannot be built."""
    from workers.engines import build_engine

    built: list[Engine] = []
    try:
        for p in planned_engines(specs, override, instances, only):
            try:
                built.append(build_engine(p.spec, p.index, p.count))
            except ValueError as exc:  # MissingSetting included: a setting it lacks
                raise EngineProblem(p.pipeline, p.engine, str(exc), usage=True) from None
            except RuntimeError as exc:  # an optional dependency that is not installed
                raise EngineProblem(p.pipeline, p.engine, str(exc), usage=False) from None
    finally:
        _close(built)


def _close(engines: list[Engine]) -> None:
    """Close engines that were never started (nothing to flush: best effort). Run on a
    loop of its own: the callers check before theirs starts."""
    if not engines:
        return

    async def close_all() -> None:
        for engine in engines:
            with contextlib.suppress(Exception):
                await engine.aclose()

    asyncio.run(close_all())
