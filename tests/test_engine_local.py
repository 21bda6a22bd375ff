"""The `local` engine with the real bundled Gemma 3 270M model (llama.cpp on the CPU)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.embedded import EmbeddedTransport
from orchestrator.engine import Delta, Engine, GenParams
from orchestrator.spec import EngineSpec, parse_pipeline
from tests import fixtures_llama
from workers.engines import build_engine
from workers.engines.common import EngineError, StopMatcher
from workers.engines.local import LocalEngine, _Formatter
from workers.engines.models import MODEL_DIR_ENV, bundled_gemma_path, resolve_model_path
from workers.runtime import Runtime

# fixture from tests/fixtures_llama.py, bound here so pytest finds it for this module
gemma_model_path = fixtures_llama.gemma_model_path

module_loop = pytest.mark.asyncio(loop_scope="module")
# the bundled model is the base Gemma 3 270M: it continues text, so prompts are text to continue
QUESTION = "Q: What is the capital of France?\nA:"
COUNTING = "1, 2, 3, 4, 5,"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(gemma_model_path: Path) -> AsyncIterator[LocalEngine]:
    """One loaded model for the module (loading per test would dominate the runtime)."""
    # one thread: llama.cpp threads spin, and a busy 2-core box starves a second one
    eng = LocalEngine(model=gemma_model_path, n_ctx=1024, n_threads=1)
    await eng.start()
    yield eng
    await eng.aclose()


async def run(engine: LocalEngine, prompt: str, params: GenParams) -> list[Delta]:
    return [d async for d in engine.generate(prompt, params)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.mark.slow
@module_loop
async def test_generates_deterministic_text_with_usage(engine: LocalEngine) -> None:
    params = GenParams(max_tokens=16, temperature=0.0)
    first = await run(engine, QUESTION, params)
    second = await run(engine, QUESTION, params)
    text = text_of(first)
    assert "paris" in text.lower(), text
    assert text == text_of(second)
    last = first[-1]
    assert all(d.finish_reason is None and d.prompt_tokens is None for d in first[:-1])
    assert last.finish_reason in ("stop", "length")
    assert last.prompt_tokens is not None and last.prompt_tokens > 5
    assert last.completion_tokens is not None and 1 <= last.completion_tokens <= 16
    # the same prompt again reuses llama.cpp's KV cache for all but the last prompt token
    assert second[-1].cached_tokens == last.prompt_tokens - 1


@pytest.mark.slow
@module_loop
async def test_max_tokens_is_respected(engine: LocalEngine) -> None:
    deltas = await run(engine, COUNTING, GenParams(max_tokens=5))
    assert deltas[-1].completion_tokens == 5
    assert deltas[-1].finish_reason == "length"
    assert text_of(deltas).strip()


@pytest.mark.slow
@module_loop
async def test_stop_string_cuts_the_output(engine: LocalEngine) -> None:
    full = text_of(await run(engine, COUNTING, GenParams(max_tokens=12)))
    assert "8" in full, full
    cut = await run(engine, COUNTING, GenParams(max_tokens=12, stop=["8,", "9"]))
    assert cut[-1].finish_reason == "stop"
    assert text_of(cut) == full[: full.index("8,")]


@pytest.mark.slow
@module_loop
async def test_closing_the_stream_stops_generation_early(engine: LocalEngine) -> None:
    before_tokens, before_cancelled = engine.completion_tokens, engine.cancelled
    stream = engine.generate(COUNTING, GenParams(max_tokens=400))
    assert (await anext(stream)).text
    await stream.aclose()
    # the next request waits until the worker let go of the context, then works
    after = await run(engine, QUESTION, GenParams(max_tokens=4))
    assert text_of(after).strip()
    assert engine.cancelled == before_cancelled + 1
    cancelled_run = engine.completion_tokens - before_tokens - after[-1].completion_tokens
    assert 1 <= cancelled_run < 100, cancelled_run  # far from the 400 it was allowed


@pytest.mark.slow
@module_loop
async def test_cancelling_the_consumer_task_stops_generation(engine: LocalEngine) -> None:
    before = engine.cancelled
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(COUNTING, GenParams(max_tokens=400)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await run(engine, QUESTION, GenParams(max_tokens=4))
    assert after[-1].completion_tokens and after[-1].completion_tokens <= 4
    assert engine.cancelled == before + 1


@pytest.mark.slow
@module_loop
async def test_chat_formatting_modes(engine: LocalEngine) -> None:
    params = GenParams(system="be brief")
    # auto: this GGUF has no chat template (a base model), so the prompt goes in as text
    assert engine._formatter is not None and engine._formatter.mode == "plain"
    assert engine._formatter.render("hi", params) == ("be brief\n\nhi", True, [])
    # true: Gemma's turn format, which carries <bos> itself
    text, add_bos, _ = _Formatter(engine._llm, True).render("hi", params)
    assert text == "<bos><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert not add_bos
    assert engine._llm.tokenize(text.encode(), add_bos=False, special=True)[:2] == [2, 105]
    # a raw completion (the gateway's /v1/completions): the prompt as written, whatever mode
    raw = GenParams(raw=True)
    assert _Formatter(engine._llm, True).render("The sky is", raw) == ("The sky is", True, [])


@pytest.mark.slow
async def test_closing_the_engine_ends_a_running_stream_with_an_error(
    gemma_model_path: Path,
) -> None:
    eng = LocalEngine(model=gemma_model_path, n_ctx=256, n_threads=1)
    stream = eng.generate(COUNTING, GenParams(max_tokens=200))
    assert (await anext(stream)).text
    await eng.aclose()  # returns once the worker has let go of the model
    with pytest.raises(EngineError, match="closed"):
        async for _ in stream:
            pass
    assert eng.cancelled == 1
    with pytest.raises(EngineError, match="closed"):
        await eng.start()


def test_from_spec_validates_options(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = build_engine(EngineSpec(kind="local", n_ctx=512, chat=False, n_threads=1), 3)
    assert isinstance(engine, LocalEngine) and isinstance(engine, Engine)
    assert (engine.capacity, engine.n_ctx, engine.chat, engine.n_threads) == (1, 512, False, 1)
    assert engine.name == "local:gemma3-270m#3"
    with pytest.raises(ValueError, match="capacity must be 1"):
        build_engine(EngineSpec(kind="local", capacity=4))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_gpu'\]"):
        build_engine(EngineSpec(kind="local", n_gpu=1))
    with pytest.raises(ValueError, match="'chat' must be true or false"):
        build_engine(EngineSpec(kind="local", chat="maybe"))


def test_each_instance_defaults_to_its_share_of_the_cpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every instance took all the CPUs for its llama.cpp threads, so `instances: 4` ran
    four times as many threads as cores; a given n_threads is kept."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert build_engine(EngineSpec(kind="local")).n_threads == 8
    assert build_engine(EngineSpec(kind="local", instances=4), 3).n_threads == 2
    assert build_engine(EngineSpec(kind="local"), 1, 3).n_threads == 2  # the runtime's count
    assert build_engine(EngineSpec(kind="local"), 0, 16).n_threads == 1
    assert build_engine(EngineSpec(kind="local", n_threads=8), 0, 4).n_threads == 8


@pytest.mark.slow
async def test_the_runtime_s_instances_share_the_cpus(
        gemma_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count the runtime runs (ALTO_INSTANCES, --instances), which the spec does not
    say, reaches each instance it builds."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    spec = parse_pipeline({"name": "p", "engines": {"default": {
        "kind": "local", "model": str(gemma_model_path), "n_ctx": 64}}, "stages": [
        {"name": "a", "kind": "lm", "prompt": "{input}", "max_tokens": 1}]})
    rt = Runtime(EmbeddedTransport(), [spec], instances=3)
    try:
        await rt.start()
        assert sorted(e.n_threads for e in rt.engines.values()) == [2, 2, 2]
    finally:
        await rt.stop(drain=False)


# ------------------------------------------------------------------------------------------
# model files
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_is_assembled_once_into_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gemma_model_path: Path
) -> None:
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    path = resolve_model_path(None)
    assert path.parent == tmp_path and path.stat().st_size == gemma_model_path.stat().st_size
    mtime = path.stat().st_mtime_ns
    assert bundled_gemma_path() == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


# ------------------------------------------------------------------------------------------
# stop strings across token boundaries
# ------------------------------------------------------------------------------------------


@given(
    text=st.text(alphabet="ab\n,", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n,", min_size=1, max_size=3), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_stop_matcher_equals_cutting_the_whole_text(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    positions = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(positions, positions[1:], strict=False)]
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert out == (text[: min(hits)] if hits else text)
    assert matcher.stopped == bool(hits)


def test_gemma_turns_render_a_conversation_as_googles_template_does() -> None:
    """One turn as before; a conversation turn by turn (assistant = model), the system
    text at the top of the first user turn, or a user turn of its own without one."""
    from workers.engines.local import gemma_turns

    one = gemma_turns("Hi", GenParams(system="Be brief."))
    assert one == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                   "<start_of_turn>model\n")
    talk = gemma_turns("(flat)", GenParams(messages=[
        {"role": "system", "content": "S"}, {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]))
    assert talk == ("<bos><start_of_turn>user\nS\n\nA<end_of_turn>\n<start_of_turn>model\n"
                    "B<end_of_turn>\n<start_of_turn>user\nC<end_of_turn>\n"
                    "<start_of_turn>model\n")
    alone = gemma_turns("(flat)", GenParams(messages=[{"role": "system", "content": "S"}]))
    assert alone == "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\n"
