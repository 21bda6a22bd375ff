"""The `vllm` engine: what must hold without vLLM (import, clear error, delta logic), and a
real generation where vLLM, a GPU and a local model are all present."""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.engine import Delta, GenParams
from orchestrator.spec import EngineSpec
from workers.engines import build_engine
from workers.engines.common import EngineError
from workers.engines.vllm_engine import (
    DeltaTracker,
    kv_cache_tokens,
    split_options,
    vllm_available,
)

MODEL_ENV = "ALTO_VLLM_TEST_MODEL"


def test_module_imports_without_vllm() -> None:
    module = importlib.import_module("workers.engines.vllm_engine")
    assert hasattr(module, "VLLMEngine")


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here: the error path is moot")
def test_build_engine_without_vllm_names_the_extra() -> None:
    with pytest.raises(RuntimeError, match=r"pip install 'alto\[vllm\]'"):
        build_engine(EngineSpec(kind="vllm", model="Qwen/Qwen2.5-0.5B-Instruct"))


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (pip install 'alto[vllm]')")
def test_model_is_required() -> None:
    with pytest.raises(ValueError, match="`model` is required"):
        build_engine(EngineSpec(kind="vllm"))


def test_split_options_rejects_unknown_names() -> None:
    fields = {"model", "gpu_memory_utilization", "max_model_len"}
    args, own = split_options({"gpu_memory_utilization": 0.5, "chat": False}, fields)
    assert args == {"gpu_memory_utilization": 0.5} and own == {"chat": False}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gpu_mem'\]"):
        split_options({"gpu_mem": 0.5}, fields)


@given(st.lists(st.tuples(st.text(max_size=5), st.integers(min_value=0, max_value=3)), max_size=12))
def test_delta_and_cumulative_outputs_give_the_same_stream(steps: list[tuple[str, int]]) -> None:
    """vLLM's DELTA outputs and its cumulative outputs must turn into identical Deltas."""
    delta, cumulative = DeltaTracker(cumulative=False), DeltaTracker(cumulative=True)
    text, ids = "", []
    new_from_delta, new_from_cumulative = [], []
    for piece, n in steps:
        text += piece
        ids += [0] * n
        new_from_delta.append(delta.update(piece, [0] * n))
        new_from_cumulative.append(cumulative.update(text, list(ids)))
    assert new_from_delta == new_from_cumulative
    assert delta.text == cumulative.text == text
    assert delta.completion_tokens == cumulative.completion_tokens == len(ids)


def test_kv_cache_size_is_read_from_either_engine_generation() -> None:
    """The planner's cache size comes from vLLM's CacheConfig, found where V1 (AsyncLLM)
    and V0 (AsyncLLMEngine) keep it; an engine that has not profiled yet says nothing."""
    cache = SimpleNamespace(num_gpu_blocks=27_000, block_size=16)
    assert kv_cache_tokens(SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache))) \
        == 432_000
    assert kv_cache_tokens(SimpleNamespace(engine=SimpleNamespace(cache_config=cache))) == 432_000
    unprofiled = SimpleNamespace(num_gpu_blocks=None, block_size=16)
    assert kv_cache_tokens(SimpleNamespace(vllm_config=SimpleNamespace(cache_config=unprofiled))) \
        is None
    assert kv_cache_tokens(object()) is None


def test_cumulative_output_that_rewrites_text_is_an_error() -> None:
    tracker = DeltaTracker(cumulative=True)
    tracker.update("Hello", [1])
    with pytest.raises(EngineError, match="does not extend"):
        tracker.update("Help", [1, 2])


def _gpu_reason() -> str | None:
    if not vllm_available():
        return "vllm is not installed (pip install 'alto[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return "vllm is installed but no CUDA GPU is visible"
    if not os.environ.get(MODEL_ENV):
        return f"set {MODEL_ENV} to a local model path or cached HF id to run vLLM end to end"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
async def test_real_vllm_streams_and_cancels() -> None:
    spec = EngineSpec(
        kind="vllm",
        model=os.environ[MODEL_ENV],
        capacity=8,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        enforce_eager=True,
    )
    engine = build_engine(spec)
    await engine.start()
    try:
        params = GenParams(max_tokens=16, temperature=0.0)
        deltas: list[Delta] = [d async for d in engine.generate("Name three colors.", params)]
        again = [d async for d in engine.generate("Name three colors.", params)]
        text = "".join(d.text for d in deltas)
        assert text.strip() and text == "".join(d.text for d in again)
        last = deltas[-1]
        assert last.finish_reason in ("stop", "length")
        assert last.prompt_tokens and 1 <= (last.completion_tokens or 0) <= 16
        assert again[-1].cached_tokens is not None and again[-1].cached_tokens > 0
        stream = engine.generate("Count from 1 to 1000.", GenParams(max_tokens=1000))
        assert (await anext(stream)).text is not None
        await stream.aclose()
        after = [d async for d in engine.generate("Say hi.", GenParams(max_tokens=4))]
        assert after[-1].finish_reason is not None
        assert (engine.cache_tokens or 0) > 0  # what the prompt-aware planner is told
    finally:
        await engine.aclose()
