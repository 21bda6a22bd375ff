"""Hosts stage runners in one process: all stages of some pipelines (embedded mode,
the gateway's default) or a single stage (`alto worker`).

Engines are shared per (engine name, instance index) across the stages of a process,
as one model server would serve several stages; an engine spec with `instances: N`
gives each LM stage N runner instances, the i-th bound to engine instance i.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from orchestrator.engine import Engine
from orchestrator.scheduling import SchedOptions
from orchestrator.spec import EngineSpec, PipelineSpec
from orchestrator.transport import Transport
from workers.engines import default_instances
from workers.router import Router, policy_router_factory
from workers.runner import Observer, RunnerConfig, StageRunner
from workers.settings import Settings
from workers.stagefn import StageFunction

log = logging.getLogger("alto.runtime")


def instance_name(stage: str, index: int = 0) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{stage}-{index}-{uuid.uuid4().hex[:6]}"


def stage_engine(spec: PipelineSpec, stage: str,
                 override: EngineSpec | None) -> tuple[str, EngineSpec]:
    """The engine an LM stage runs on and its key in a process's engine table: stages
    naming the same engine (or all of them, under an override) share its instances. The
    one rule for the runtime and for what `alto serve`/`alto run` check beforehand."""
    if override is not None:
        return f"override:{override.kind}", override
    name = spec.stage(stage).engine or "default"
    return f"{spec.name}:{name}", spec.engines[name]


@dataclass
class StageSelection:
    pipeline: str
    stage: str


class Runtime:
    def __init__(
        self,
        transport: Transport,
        pipelines: Iterable[PipelineSpec],
        *,
        config: RunnerConfig | None = None,
        observer: Observer | None = None,
        engine_override: EngineSpec | None = None,
        instances: int | None = None,
        concurrency: int | None = None,
        router_factory: Callable[[PipelineSpec, str], Router] | None = None,
        policy: str | None = None,
        sched_options: SchedOptions | None = None,
    ):
        """`policy` (ALTO_POLICY syntax: "prompt_aware" or "stage=policy,...") overrides
        the spec's per-stage scheduling policies; it is ignored if `router_factory` is given.
        """
        if router_factory is None:
            # a PolicyRouter only where some LM stage has a policy; the plain Router otherwise
            router_factory = policy_router_factory(policy, sched_options)
        self.transport = transport
        self.pipelines = {p.name: p for p in pipelines}
        self.config = config or RunnerConfig()
        self.observer = observer
        self.engine_override = engine_override
        self.instances = instances
        self.concurrency = concurrency
        self.router_factory = router_factory
        self.engines: dict[tuple[str, int], Engine] = {}
        self.runners: list[StageRunner] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.failure = asyncio.Event()

    @classmethod
    def embedded(cls, transport: Transport, pipelines: Iterable[PipelineSpec],
                 settings: Settings, *, engine_override: EngineSpec | None = None,
                 observer: Observer | None = None) -> Runtime:
        """Every stage of `pipelines` in this process, configured by the ALTO_* settings as
        `alto serve` and `alto run` both run it (one builder, so they cannot drift apart:
        `alto run` used to ignore ALTO_INSTANCES, ALTO_CONCURRENCY and the runner settings)."""
        return cls(transport, pipelines, config=RunnerConfig.from_settings(settings),
                   observer=observer, engine_override=engine_override,
                   instances=settings.instances, concurrency=settings.concurrency,
                   policy=settings.policy)

    def _engine_spec(self, spec: PipelineSpec, stage: str) -> tuple[str, EngineSpec]:
        return stage_engine(spec, stage, self.engine_override)

    async def _engine(self, key: str, espec: EngineSpec, index: int, count: int) -> Engine:
        """Instance `index` of the `count` this process runs of engine `key`."""
        from workers.engines import build_engine

        if (key, index) not in self.engines:
            engine = build_engine(espec, index, count)
            await engine.start()
            self.engines[(key, index)] = engine
        return self.engines[(key, index)]

    async def start(self, only: list[StageSelection] | None = None) -> None:
        """Build engines and start runners; raises (with the stage named) if one cannot."""
        for spec in self.pipelines.values():
            for stage in spec.topo_order:
                if only is not None and not any(
                    o.pipeline == spec.name and o.stage == stage for o in only
                ):
                    continue
                s = spec.stage(stage)
                count = 1
                key, espec = ("", None) if s.kind != "lm" else self._engine_spec(spec, stage)
                if espec is not None:
                    count = self.instances or default_instances(espec)
                for i in range(count):
                    engine = (await self._engine(key, espec, i, count) if espec is not None
                              else None)
                    fn = StageFunction(spec, s, engine)
                    router = self.router_factory(spec, stage) if self.router_factory else None
                    runner = StageRunner(
                        spec,
                        stage,
                        self.transport,
                        fn,
                        instance=instance_name(stage, i),
                        concurrency=self.concurrency,
                        config=self.config,
                        observer=self.observer,
                        router=router,
                    )
                    self.runners.append(runner)
        for r in self.runners:
            task = asyncio.create_task(r.run(self._stop), name=f"runner:{r.stage.name}")
            task.add_done_callback(self._runner_ended)
            self._tasks.append(task)

    def _runner_ended(self, task: asyncio.Task[None]) -> None:
        """A runner that dies must not leave its runs hanging unnoticed: log it loudly and
        wake whoever waits in `wait_failure` (the CLI and the gateway's readiness)."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s crashed", task.get_name(), exc_info=task.exception())
        self.failure.set()

    async def wait_failure(self) -> BaseException:
        await self.failure.wait()
        exc = self.failed()
        assert exc is not None
        return exc

    async def stop(self, *, drain: bool = True) -> None:
        self._stop.set()
        if not drain:
            for r in self.runners:
                await r.abort()
        try:
            for t in self._tasks:
                with contextlib.suppress(Exception):
                    await t
            for e in self.engines.values():
                with contextlib.suppress(Exception):
                    await e.aclose()
        finally:  # even if this stop is itself cancelled
            for r in self.runners:
                r.function.close()

    def serves(self, group: str) -> bool:
        """Whether a runner of stage group `group` is running in this process. Its
        heartbeat says the same to other processes, but the gateway beside it need not
        wait for one: after the event loop stalls past the member TTL (a long GC, a
        blocking call, a loaded machine) the heartbeat has lapsed although the runner is
        alive, and the gateway answered 503 no_workers until the runner's next beat."""
        return any(r.group == group and not t.done()
                   for r, t in zip(self.runners, self._tasks, strict=False))

    def failed(self) -> BaseException | None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                return t.exception()
        return None
