"""Engine models: the LMs behind pipelines, served directly as OpenAI models.

Every engine a pipeline declares (its `engines:` section, or one its LM stages use) is a
model named `<pipeline>/<engine>`; an engine that names its `model` is also reachable by
that name when no pipeline or other engine has it. A request for such a model is a plain
LM call: no pipeline, no transport. In embedded mode the call goes to the very engine
instances the runtime's stages use (the least loaded one), so a proxied request competes
for the same batch slots and prefix cache as pipeline work, as it would on a shared model
server; without a local runtime (Redis gateway) the gateway builds the engine itself on
first use. `--engine KIND` overrides apply here as they do to the stages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass

from orchestrator.engine import Engine
from orchestrator.spec import EngineSpec, PipelineSpec
from workers.runtime import Runtime


@dataclass(frozen=True)
class EngineModel:
    id: str
    pipeline: str
    engine: str  # its name in the pipeline's `engines:` section
    spec: EngineSpec  # effective spec (the override, when one is set)
    key: str  # the runtime's engine key


def _engine_names(spec: PipelineSpec) -> list[str]:
    used = {s.engine or "default" for s in spec.stages if s.kind == "lm"}
    declared = set(spec.engines) if "engines" in spec.model_fields_set else set()
    return sorted(used | declared)


class EnginePool:
    def __init__(
        self,
        pipelines: dict[str, PipelineSpec],
        runtime: Runtime | None,
        override: EngineSpec | None,
    ) -> None:
        self.runtime = runtime
        self.override = override
        self.models: dict[str, EngineModel] = {}
        for spec in pipelines.values():
            for name in _engine_names(spec):
                espec = override or spec.engines[name]
                key = f"override:{override.kind}" if override else f"{spec.name}:{name}"
                self.models[f"{spec.name}/{name}"] = EngineModel(
                    f"{spec.name}/{name}", spec.name, name, espec, key
                )
        for m in list(self.models.values()):
            alias = pipelines[m.pipeline].engines[m.engine].model
            if alias and alias not in pipelines and alias not in self.models:
                self.models[alias] = m
        self._built: dict[str, Engine] = {}
        self._lock = asyncio.Lock()
        self._rr = itertools.count()

    def resolve(self, name: str) -> EngineModel | None:
        return self.models.get(name)

    def canonical(self) -> list[EngineModel]:
        """Each engine once (aliases left out)."""
        return [m for name, m in self.models.items() if name == m.id]

    async def engine(self, model: EngineModel) -> Engine:
        candidates: list[Engine] = []
        if self.runtime is not None:
            candidates = [e for (key, _), e in self.runtime.engines.items() if key == model.key]
        if not candidates:
            async with self._lock:
                if model.key not in self._built:
                    from workers.engines import build_engine

                    engine = build_engine(model.spec, 0)
                    await engine.start()
                    self._built[model.key] = engine
            candidates = [self._built[model.key]]
        loads = [getattr(e, "load", None) for e in candidates]
        if all(callable(f) for f in loads):
            return min(candidates, key=lambda e: e.load())  # type: ignore[attr-defined]
        return candidates[next(self._rr) % len(candidates)]

    async def close(self) -> None:
        built, self._built = self._built, {}
        for engine in built.values():
            with contextlib.suppress(Exception):  # best effort at shutdown
                await engine.aclose()
