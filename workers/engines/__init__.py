"""Engine registry: one place that turns an `EngineSpec` into a running-ready engine.

Why lazy imports: each engine kind drags in different heavy dependencies (llama.cpp, vLLM
and torch); a worker for a `sim` or `openai` stage must start on a machine that has none of
them, and a missing optional dependency must surface as a clear error naming the extra to
install, at the moment that kind is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.engine import Engine
from orchestrator.spec import EngineSpec

ENGINE_KINDS = ("sim", "openai", "local", "vllm")


def _sim(spec: EngineSpec, instance: int, instances: int | None = None) -> Engine:
    from workers.engines.sim import SimEngine

    return SimEngine.from_spec(spec, instance)


def _openai(spec: EngineSpec, instance: int, instances: int | None = None) -> Engine:
    from workers.engines.openai_compat import OpenAIEngine

    return OpenAIEngine.from_spec(spec, instance)


def _local(spec: EngineSpec, instance: int, instances: int | None = None) -> Engine:
    from workers.engines.local import LocalEngine

    return LocalEngine.from_spec(spec, instance, instances)


def _vllm(spec: EngineSpec, instance: int, instances: int | None = None) -> Engine:
    from workers.engines.vllm_engine import VLLMEngine

    return VLLMEngine.from_spec(spec, instance)


# (spec, instance, instances): only `local` needs the count (its instances share the CPUs)
_BUILDERS: dict[str, Callable[[EngineSpec, int, int | None], Engine]] = {
    "sim": _sim,
    "openai": _openai,
    "local": _local,
    "vllm": _vllm,
}


def build_engine(spec: EngineSpec, instance: int = 0, instances: int | None = None) -> Engine:
    """Build (but do not start) instance `instance` of the `instances` (default: the spec's
    `instances`) of the engine `spec` describes: a `local` engine's instances share the
    CPUs, so each needs to know how many there are.

    Raises ValueError for a bad option and RuntimeError when the kind's optional
    dependency is not installed; `await engine.start()` then loads weights or connects.
    """
    if instance < 0:
        raise ValueError(f"engine instance must be >= 0, got {instance}")
    try:
        builder = _BUILDERS[spec.kind]
    except KeyError:
        raise ValueError(
            f"unknown engine kind {spec.kind!r}; known kinds: {list(ENGINE_KINDS)}"
        ) from None
    return builder(spec, instance, instances)


def fleet(spec: EngineSpec) -> list[str]:
    """The servers of an `openai` engine (its `base_url` list, or ALTO_OPENAI_BASE_URL's);
    [] for other kinds."""
    if spec.kind != "openai":
        return []
    from workers.engines.openai_compat import servers

    return servers(spec)


def default_instances(spec: EngineSpec) -> int:
    """How many instances of the engine to run when the caller does not say: `instances`
    when the spec sets it, else one per server of an `openai` fleet (the one place that
    counts them: the spec is validated without the environment, which may list them)."""
    if "instances" in spec.model_fields_set:
        return spec.instances
    n = len(fleet(spec))
    if n > 256:
        raise ValueError(f"base_url lists {n} servers; at most 256")
    return max(spec.instances, n)


__all__ = ["ENGINE_KINDS", "build_engine", "default_instances", "fleet"]
