"""Tests for the sim engine and the shared tokenizer.

Time is a test double here, never a measurement: the engine takes an injectable `sleep`,
and the tests pass one that records the requested durations and returns at once
(`RecordingSleep`) or only when the test lets a step finish (`GatedSleep`). So every
timing assertion checks the *formula*, and nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.engine import Delta, Engine, GenParams
from orchestrator.spec import EngineSpec
from tests.waiting import loop_turn
from workers.engines import sim
from workers.engines.sim import PrefixCache, SimEngine, pseudo_text, resolve_responder
from workers.engines.tokens import count_tokens, detokenize, tokenize

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


class RecordingSleep:
    """Records each requested sleep and returns at once (yielding to the event loop)."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.durations.append(seconds)
        await loop_turn()


class GatedSleep:
    """Each step's sleep blocks until the test releases it, so the test sees every step."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._released = 0
        self._cond = asyncio.Condition()

    async def __call__(self, seconds: float) -> None:
        self.durations.append(seconds)
        index = len(self.durations)
        async with self._cond:
            self._cond.notify_all()
            await self._cond.wait_for(lambda: self._released >= index)

    async def wait_calls(self, n: int, timeout: float = 5.0) -> None:
        """Wait until the n-th step is sleeping (its composition is then fixed)."""
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: len(self.durations) >= n)

    async def release(self, n: int = 1) -> None:
        async with self._cond:
            self._released += n
            self._cond.notify_all()


def words(n: int, tag: str = "w") -> str:
    """A text of exactly n tokens: 'w0 w1 ... w{n-1}'."""
    return " ".join(f"{tag}{i}" for i in range(n))


def fixed(n: int, tag: str = "out") -> Callable[[str, GenParams], str]:
    """A responder that always answers with exactly n tokens."""
    return lambda prompt, params: words(n, tag)


def params(max_tokens: int = 256, responder: Any = None, **kw: Any) -> GenParams:
    tags = {"responder": responder} if responder is not None else {}
    return GenParams(max_tokens=max_tokens, tags=tags, **kw)


async def collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    return [d async for d in stream]


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., SimEngine]]:
    engines: list[SimEngine] = []

    def make(**kw: Any) -> SimEngine:
        kw.setdefault("sleep", RecordingSleep())
        engine = SimEngine(**kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


# round numbers make expected step times easy to read
BASE, PER_SEQ, PREFILL = 0.010, 0.001, 0.0001


def formula(batch: int, prefill_tokens: int) -> float:
    return BASE + PER_SEQ * batch + PREFILL * prefill_tokens


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------


def test_tokenize_examples() -> None:
    assert tokenize("Hello, world!\n") == ["Hello", ",", " world", "!", "\n"]
    assert tokenize("  two  spaces  ") == ["  two", "  spaces", "  "]
    assert tokenize("") == []
    assert count_tokens("a b c.") == 4


@given(st.text())
def test_tokenize_is_lossless_and_counts_agree(text: str) -> None:
    tokens = tokenize(text)
    assert detokenize(tokens) == text
    assert count_tokens(text) == len(tokens)
    assert all(tok for tok in tokens)
    # each token holds at most one non-space run, so it cannot be split further
    assert all(tokenize(tok) == [tok] for tok in tokens)


# ------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------


def test_calibration_reproduces_the_published_figures() -> None:
    cal = sim.CALIBRATION
    b, x, p = cal.decode_base_ms, cal.decode_per_seq_ms, cal.prefill_ms_per_token
    # [A] a lone sequence decodes at 70.5 ms per 10-step chunk
    assert b + x == pytest.approx(7.05)
    # [A] ten prompts (1369 tokens) prefilled in one step: TTFT 62.19 ms
    assert b + 10 * x + 1369 * p == pytest.approx(62.19)
    # [B]+[C] a saturated engine (B=256) spends exactly one second per second
    steps_per_s = 8088.35 / 256
    prefill_per_s = 8088.35 / (178793 / 1000) * (215196 / 1000)
    assert steps_per_s * (b + 256 * x) + prefill_per_s * p == pytest.approx(1000.0)
    # the figure not used in the fit: [A] batch 10 decodes at 75.3 ms per 10-step chunk
    assert b + 10 * x == pytest.approx(7.53, rel=0.01)
    # plausibility: prefill ~25k tok/s, and the defaults are the fitted values
    assert 20_000 < 1000 / p < 30_000
    assert x / 1000 == pytest.approx(sim.DEFAULT_DECODE_PER_SEQ_S)
    assert sim.DEFAULT_CACHE_BLOCKS == 52 * 2**30 // (16 * 128 * 1024)


# ------------------------------------------------------------------------------------------
# timing model
# ------------------------------------------------------------------------------------------


async def test_step_durations_follow_the_formula(make_engine: Callable[..., SimEngine]) -> None:
    sleep = RecordingSleep()
    engine = make_engine(
        decode_base_s=BASE,
        decode_per_seq_s=PER_SEQ,
        prefill_s_per_token=PREFILL,
        time_scale=0.5,
        sleep=sleep,
    )
    s1 = engine.generate(words(40, "a"), params(responder=fixed(3)))
    s2 = engine.generate(words(24, "b"), params(responder=fixed(5)))
    out1, out2 = await asyncio.gather(collect(s1), collect(s2))

    assert [len(out1), len(out2)] == [3, 5]
    expected = [formula(2, 64), formula(2, 0), formula(2, 0), formula(1, 0), formula(1, 0)]
    log = list(engine.step_log)
    assert [r.duration_s for r in log] == pytest.approx(expected)
    assert [r.batch_size for r in log] == [2, 2, 2, 1, 1]
    assert [r.prefill_tokens for r in log] == [64, 0, 0, 0, 0]
    assert [r.start_s for r in log] == pytest.approx(
        [sum(expected[:i]) for i in range(len(expected))]
    )
    # the engine really sleeps the simulated time compressed by time_scale
    assert sleep.durations == pytest.approx([d * 0.5 for d in expected])
    assert engine.sim_time_s == pytest.approx(sum(expected))
    # both first tokens arrive after the shared prefill step
    assert list(engine.ttft_s) == pytest.approx([expected[0], expected[0]])


async def test_bigger_batches_make_steps_slower(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine()  # calibrated defaults
    await collect(engine.generate(words(8), params(responder=fixed(4))))
    alone = engine.step_log[-1]
    await asyncio.gather(
        *(collect(engine.generate(words(8, f"q{i}"), params(responder=fixed(4)))) for i in range(5))
    )
    crowded = engine.step_log[-1]
    assert (alone.batch_size, alone.prefill_tokens) == (1, 0)
    assert (crowded.batch_size, crowded.prefill_tokens) == (5, 0)
    assert crowded.duration_s > alone.duration_s
    assert crowded.duration_s - alone.duration_s == pytest.approx(4 * sim.DEFAULT_DECODE_PER_SEQ_S)


async def test_capacity_queues_the_extra_request_until_a_slot_frees(
    make_engine: Callable[..., SimEngine],
) -> None:
    gate = GatedSleep()
    engine = make_engine(capacity=2, sleep=gate)
    streams = [
        engine.generate(words(10, "a"), params(responder=fixed(2))),
        engine.generate(words(10, "b"), params(responder=fixed(4))),
        engine.generate(words(10, "c"), params(responder=fixed(2))),
    ]
    assert (engine.running, engine.queued, engine.load()) == (0, 3, 3)
    consumers = [asyncio.create_task(collect(s)) for s in streams]

    await gate.wait_calls(1)  # step 1: a and b admitted, c waits
    assert (engine.running, engine.queued, engine.load()) == (2, 1, 3)
    assert engine.step_log[-1].admitted == 2
    await gate.release()

    await gate.wait_calls(2)  # step 2: a still running (its second token ends this step)
    assert (engine.running, engine.queued) == (2, 1)
    assert engine.step_log[-1].admitted == 0
    await gate.release()

    await gate.wait_calls(3)  # step 3: a finished, c took its slot
    assert (engine.running, engine.queued) == (2, 0)
    assert engine.step_log[-1].admitted == 1
    assert engine.step_log[-1].prefill_tokens == 10
    await gate.release(10)

    outs = await asyncio.gather(*consumers)
    assert [len(o) for o in outs] == [2, 4, 2]
    assert [r.batch_size for r in engine.step_log] == [2, 2, 2, 2]
    assert engine.load() == 0


async def test_prefill_budget_splits_admissions_across_steps(
    make_engine: Callable[..., SimEngine],
) -> None:
    engine = make_engine(max_prefill_tokens=50, capacity=8)
    outs = await asyncio.gather(
        collect(engine.generate(words(30, "a"), params(responder=fixed(3)))),
        collect(engine.generate(words(30, "b"), params(responder=fixed(3)))),
        collect(engine.generate(words(80, "c"), params(responder=fixed(3)))),
    )
    assert all(len(o) == 3 for o in outs)
    log = list(engine.step_log)
    # 30 fits; 30+30 > 50 waits a step; 80 alone exceeds the budget but is still admitted
    assert [r.admitted for r in log[:3]] == [1, 1, 1]
    assert [r.prefill_tokens for r in log[:3]] == [30, 30, 80]


# ------------------------------------------------------------------------------------------
# prefix cache
# ------------------------------------------------------------------------------------------


async def test_shared_prefix_pays_prefill_only_for_uncached_tokens(
    make_engine: Callable[..., SimEngine],
) -> None:
    engine = make_engine(
        decode_base_s=BASE, decode_per_seq_s=PER_SEQ, prefill_s_per_token=PREFILL, block_size=16
    )
    a_words = words(100, "a").split()
    prompt_a = " ".join(a_words)
    prompt_b = " ".join(a_words[:80] + words(20, "b").split())

    first = (await collect(engine.generate(prompt_a, params(responder=fixed(2)))))[-1]
    b_start = len(engine.step_log)
    second = (await collect(engine.generate(prompt_b, params(responder=fixed(2)))))[-1]

    assert (first.prompt_tokens, first.cached_tokens) == (100, 0)
    assert (second.prompt_tokens, second.cached_tokens) == (100, 80)  # 5 shared full blocks
    assert engine.step_log[b_start].prefill_tokens == 20
    assert engine.step_log[b_start].duration_s == pytest.approx(formula(1, 20))
    assert (engine.prompt_tokens, engine.cached_tokens) == (200, 80)
    assert engine.prefix_hit_rate == pytest.approx(0.4)

    # the same prompt again hits all 6 of its full blocks
    again = (await collect(engine.generate(prompt_a, params(responder=fixed(2)))))[-1]
    assert again.cached_tokens == 96
    assert engine.stats()["cached_tokens"] == 176


async def test_a_fully_cached_prompt_still_computes_its_last_block(
    make_engine: Callable[..., SimEngine],
) -> None:
    engine = make_engine(block_size=16)
    prompt = words(32)
    await collect(engine.generate(prompt, params(responder=fixed(1))))
    last = (await collect(engine.generate(prompt, params(responder=fixed(1)))))[-1]
    assert last.cached_tokens == 16  # not 32: at least one token must be prefilled
    assert engine.step_log[-1].prefill_tokens == 16


async def test_lru_evicts_tail_blocks_first(make_engine: Callable[..., SimEngine]) -> None:
    a, b = words(16, "a"), words(16, "b")  # 4 blocks of 4 tokens each

    small = make_engine(block_size=4, cache_blocks=4)
    for prompt in (a, b):
        await collect(small.generate(prompt, params(responder=fixed(1))))
    again = (await collect(small.generate(a, params(responder=fixed(1)))))[-1]
    assert again.cached_tokens == 0  # b's 4 blocks pushed all of a's out
    assert small.cache.evictions >= 4

    roomier = make_engine(block_size=4, cache_blocks=6)
    for prompt in (a, b):
        await collect(roomier.generate(prompt, params(responder=fixed(1))))
    again = (await collect(roomier.generate(a, params(responder=fixed(1)))))[-1]
    # b evicted a's two *tail* blocks; a's head blocks 0 and 1 survived
    assert again.cached_tokens == 8
    assert len(roomier.cache) == 6


class ReferenceCache:
    """Independent model of the spec: prefixes as tuples in a recency list."""

    def __init__(self, block_size: int, capacity: int) -> None:
        self.bs = block_size
        self.capacity = capacity
        self.order: list[tuple[str, ...]] = []  # least recently used first

    def _touch(self, prefix: tuple[str, ...]) -> None:
        if prefix in self.order:
            self.order.remove(prefix)
        if self.capacity == 0:
            return
        self.order.append(prefix)
        while len(self.order) > self.capacity:
            self.order.pop(0)

    def match(self, tokens: list[str]) -> int:
        limit = (len(tokens) - 1) // self.bs if tokens else 0
        hits = 0
        while hits < limit and tuple(tokens[: (hits + 1) * self.bs]) in self.order:
            hits += 1
        for i in reversed(range(hits)):
            self._touch(tuple(tokens[: (i + 1) * self.bs]))
        return hits * self.bs

    def insert(self, tokens: list[str]) -> None:
        for i in reversed(range(len(tokens) // self.bs)):
            self._touch(tuple(tokens[: (i + 1) * self.bs]))


VOCAB = ["x", "y", "z", "w"]
token_lists = st.lists(st.sampled_from(VOCAB), max_size=24)


@st.composite
def prompt_workloads(draw: st.DrawFn) -> tuple[int, int, list[list[str]]]:
    """Prompts that share prefixes: each is a stem (or a cut of one) plus a random tail."""
    block_size = draw(st.integers(1, 5))
    capacity = draw(st.integers(0, 12))
    stems = draw(st.lists(token_lists, min_size=1, max_size=4))
    prompts = []
    for _ in range(draw(st.integers(1, 12))):
        stem = draw(st.sampled_from(stems))
        cut = draw(st.integers(0, len(stem)))
        prompts.append(stem[:cut] + draw(token_lists))
    return block_size, capacity, prompts


@given(prompt_workloads())
def test_prefix_cache_matches_reference_model(
    workload: tuple[int, int, list[list[str]]],
) -> None:
    block_size, capacity, prompts = workload
    cache, ref = PrefixCache(block_size, capacity), ReferenceCache(block_size, capacity)
    for tokens in prompts:
        got = cache.match(tokens)
        assert got == ref.match(tokens)
        assert got % block_size == 0
        assert got <= max(0, len(tokens) - 1)
        cache.insert(tokens)
        ref.insert(tokens)
        assert len(cache) == len(ref.order) <= capacity


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_workloads())
def test_engine_prefix_hits_match_reference_model(
    workload: tuple[int, int, list[list[str]]],
) -> None:
    """End to end through the engine: prompts sent one after another, as text."""
    block_size, capacity, prompts = workload
    texts = [" ".join(t) for t in prompts]

    async def run() -> list[Delta]:
        engine = SimEngine(block_size=block_size, cache_blocks=capacity, sleep=RecordingSleep())
        try:
            return [
                (await collect(engine.generate(text, params(responder=fixed(1)))))[-1]
                for text in texts
            ] + [Delta("", prompt_tokens=engine.prompt_tokens, cached_tokens=engine.cached_tokens)]
        finally:
            await engine.aclose()

    *finals, totals = asyncio.run(run())
    ref = ReferenceCache(block_size, capacity)
    expected = []
    for text in texts:
        tokens = tokenize(text)
        expected.append(ref.match(tokens))
        ref.insert(tokens)
    assert [f.cached_tokens for f in finals] == expected
    assert [f.prompt_tokens for f in finals] == [len(tokenize(t)) for t in texts]
    assert totals.cached_tokens == sum(expected) <= (totals.prompt_tokens or 0)


# ------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------


async def test_default_text_is_deterministic_per_prompt(
    make_engine: Callable[..., SimEngine],
) -> None:
    e1, e2 = make_engine(name="sim#0"), make_engine(name="sim#1")
    p = GenParams(max_tokens=64)
    one = await collect(e1.generate("What is the capital of France?", p))
    two = await collect(e2.generate("What is the capital of France?", p))
    other = await collect(e1.generate("What is the capital of Spain?", p))
    reseeded = await collect(make_engine(seed=7).generate("What is the capital of France?", p))

    def text(ds: list[Delta]) -> str:
        return "".join(d.text for d in ds)

    assert text(one) == text(two)
    assert text(one) != text(other)
    assert text(one) != text(reseeded)
    assert 16 <= one[-1].completion_tokens <= 64  # type: ignore[operator]
    assert one[-1].completion_tokens == len(one) == count_tokens(text(one))
    assert all(len(tokenize(d.text)) == 1 for d in one)  # one token per delta
    assert all(d.finish_reason is None for d in one[:-1])
    assert one[-1].finish_reason == "stop"


@given(st.text(max_size=60), st.integers(1, 300), st.integers(0, 3))
def test_pseudo_text_has_exactly_the_drawn_length(prompt: str, max_tokens: int, seed: int) -> None:
    text = pseudo_text(prompt, max_tokens, seed=seed)
    n = count_tokens(text)
    assert min(16, max_tokens) <= n <= max_tokens
    assert pseudo_text(prompt, max_tokens, seed=seed) == text


async def test_max_tokens_truncates_with_finish_length(
    make_engine: Callable[..., SimEngine],
) -> None:
    engine = make_engine()
    long = await collect(engine.generate("q", params(max_tokens=10, responder=fixed(30))))
    assert len(long) == 10
    assert "".join(d.text for d in long) == detokenize(tokenize(words(30, "out"))[:10])
    assert (long[-1].completion_tokens, long[-1].finish_reason) == (10, "length")

    short = await collect(engine.generate("q", params(max_tokens=50, responder=fixed(30))))
    assert "".join(d.text for d in short) == words(30, "out")
    assert (short[-1].completion_tokens, short[-1].finish_reason) == (30, "stop")


async def test_default_text_cut_by_max_tokens_finishes_with_length(
    make_engine: Callable[..., SimEngine],
) -> None:
    """The default text's length is drawn from min_tokens (16) up to max_tokens: below 16
    the cap cuts every answer, and a client must hear it ("length"). Text, token counts and
    steps stay as they were (the calibrated benchmarks' draws do not move)."""
    engine = make_engine()
    cut = await collect(engine.generate("q", GenParams(max_tokens=5)))
    assert "".join(d.text for d in cut) == pseudo_text("q", 5)
    assert (cut[-1].completion_tokens, cut[-1].finish_reason) == (5, "length")
    assert len(engine.step_log) == 5  # one token a step, as before

    # a stop string the capped text holds ends it first
    stop = tokenize(pseudo_text("q", 5))[3]
    stopped = await collect(engine.generate("q", GenParams(max_tokens=5, stop=[stop])))
    assert stopped[-1].finish_reason == "stop" and stopped[-1].completion_tokens < 5

    # at min_tokens, or from a lower min_tokens up, the drawn length is not cut
    whole = await collect(engine.generate("q", GenParams(max_tokens=16)))
    assert (whole[-1].completion_tokens, whole[-1].finish_reason) == (16, "stop")
    low = await collect(make_engine(min_tokens=2).generate("q", GenParams(max_tokens=5)))
    assert "".join(d.text for d in low) == pseudo_text("q", 5, min_tokens=2)
    assert low[-1].finish_reason == "stop"


async def test_stop_string_cuts_the_answer(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine()
    out = await collect(
        engine.generate(
            "q", params(responder=lambda p, g: "alpha beta STOP gamma", stop=["STOP", "zzz"])
        )
    )
    assert "".join(d.text for d in out) == "alpha beta "
    assert out[-1].finish_reason == "stop"


async def test_empty_answer_still_costs_one_step(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine()
    out = await collect(engine.generate("q", params(responder=lambda p, g: "")))
    assert len(out) == 1
    assert (out[0].text, out[0].completion_tokens, out[0].finish_reason) == ("", 0, "stop")
    assert len(engine.step_log) == 1


async def test_responder_receives_prompt_and_params(make_engine: Callable[..., SimEngine]) -> None:
    seen: list[tuple[str, str | None]] = []

    def responder(prompt: str, p: GenParams) -> str:
        seen.append((prompt, p.system))
        return "ok"

    engine = make_engine()
    out = await collect(engine.generate("hi there", params(responder=responder, system="be brief")))
    assert seen == [("hi there", "be brief")]
    # the system prompt counts as prompt tokens: 'be brief' + '\n\nhi there'
    assert out[-1].prompt_tokens == 4


def test_resolve_responder_by_name() -> None:
    assert resolve_responder("workers.engines.sim:pseudo_text") is pseudo_text
    assert resolve_responder(None) is None
    with pytest.raises(ValueError, match="package.module:function"):
        resolve_responder("no_colon_here")
    with pytest.raises(TypeError, match="callable"):
        resolve_responder(42)


async def test_responder_must_return_text(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine()
    with pytest.raises(TypeError, match="expected str"):
        engine.generate("q", params(responder=lambda p, g: 42))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate("q", GenParams(max_tokens=0))
    assert engine.requests == 0


# ------------------------------------------------------------------------------------------
# cancellation and lifecycle
# ------------------------------------------------------------------------------------------


async def test_closing_the_stream_frees_the_slot(make_engine: Callable[..., SimEngine]) -> None:
    gate = GatedSleep()
    engine = make_engine(capacity=1, sleep=gate)
    stream = engine.generate(words(10), params(responder=fixed(50)))
    waiting = engine.generate(words(10, "z"), params(responder=fixed(2)))
    got = []
    for step in (1, 2):
        await gate.wait_calls(step)
        await gate.release()
        got.append(await anext(stream))
    assert [d.text for d in got] == ["out0", " out1"]
    assert (engine.running, engine.queued) == (1, 1)

    await stream.aclose()  # type: ignore[attr-defined]
    await engine.wait_until(lambda e: e.cancelled == 1 and e.running == 0)
    assert engine.completed == 0
    # step 3 was already in flight; when it ends, the freed slot goes to the waiting request
    await gate.release()
    await engine.wait_until(lambda e: e.running == 1 and e.queued == 0)
    await gate.release(100)
    rest = await collect(waiting)
    assert "".join(d.text for d in rest) == words(2, "out")
    assert [r.admitted for r in engine.step_log] == [1, 0, 0, 1, 0]
    assert engine.step_log[3].prefill_tokens == 10
    # nothing was emitted for the cancelled request after it was closed
    assert engine.completion_tokens == 2 + 2
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_cancelling_the_consumer_task_frees_the_slot(
    make_engine: Callable[..., SimEngine],
) -> None:
    gate = GatedSleep()
    engine = make_engine(sleep=gate)
    stream = engine.generate("q", params(responder=fixed(50)))
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            first.set()

    task = asyncio.create_task(consume())
    await gate.wait_calls(1)
    await gate.release()
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.wait_until(lambda e: e.running == 0 and e.cancelled == 1)
    assert engine.load() == 0


async def test_a_queued_request_can_be_cancelled(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine(capacity=1)
    running = engine.generate("a", params(responder=fixed(3)))
    queued = engine.generate("b", params(responder=fixed(3)))
    assert engine.queued == 2
    await queued.aclose()  # type: ignore[attr-defined]
    # closing does not wait for the step loop: the request left the queue at once
    assert (engine.queued, engine.cancelled, engine.steps) == (1, 1, 0)
    out = await collect(running)
    assert len(out) == 3
    await engine.wait_until(lambda e: e.load() == 0)
    assert (engine.completed, engine.cancelled, engine.requests) == (1, 1, 2)
    # only the surviving request ever ran
    assert [(r.batch_size, r.admitted) for r in engine.step_log] == [(1, 1), (1, 0), (1, 0)]


async def test_a_dropped_stream_is_cancelled(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine()
    stream = engine.generate("never read", params(responder=fixed(100)))
    assert engine.load() == 1
    del stream
    gc.collect()
    await engine.wait_until(lambda e: e.cancelled == 1 and e.load() == 0)


async def test_finished_then_closed_is_not_a_cancellation(
    make_engine: Callable[..., SimEngine],
) -> None:
    engine = make_engine()
    stream = engine.generate("q", params(responder=fixed(2)))
    await engine.wait_until(lambda e: e.completed == 1)  # generated, not yet read
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.cancelled == 0


async def test_aclose_ends_open_streams_and_refuses_new_work() -> None:
    gate = GatedSleep()
    engine = SimEngine(sleep=gate)
    stream = engine.generate("q", params(responder=fixed(5)))
    await gate.wait_calls(1)
    await engine.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await anext(stream)
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate("q", GenParams())
    with pytest.raises(RuntimeError, match="closed"):
        await engine.start()
    assert engine.load() == 0


async def test_a_failing_sleeper_fails_the_streams_instead_of_hanging() -> None:
    async def broken(_: float) -> None:
        raise OSError("clock exploded")

    engine = SimEngine(sleep=broken)
    stream = engine.generate("q", params(responder=fixed(3)))
    with pytest.raises(RuntimeError, match="clock exploded"):
        await anext(stream)
    await engine.aclose()


# ------------------------------------------------------------------------------------------
# construction from a spec
# ------------------------------------------------------------------------------------------


def test_from_spec_reads_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sim.TIME_SCALE_ENV, raising=False)
    spec = EngineSpec.model_validate(
        {
            "kind": "sim",
            "model": "tiny",
            "capacity": 3,
            "time_scale": 0.25,
            "decode_base_ms": 5,
            "decode_per_seq_ms": 0.5,
            "prefill_tokens_per_s": 10000,
            "block_size": 8,
            "cache_blocks": 99,
            "seed": 4,
            "max_prefill_tokens": None,
        }
    )
    engine = SimEngine.from_spec(spec, instance=2)
    assert isinstance(engine, Engine)
    assert engine.name == "sim:tiny#2"
    assert engine.capacity == 3
    assert engine.time_scale == 0.25
    assert engine.step_duration(batch_size=2, prefill_tokens=100) == pytest.approx(
        0.005 + 2 * 0.0005 + 100 / 10000
    )
    assert (engine.cache.block_size, engine.cache.capacity_blocks) == (8, 99)
    assert (engine.seed, engine.max_prefill_tokens) == (4, None)


def test_from_spec_defaults_are_the_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sim.TIME_SCALE_ENV, raising=False)
    engine = SimEngine.from_spec(EngineSpec(), instance=0)
    assert engine.capacity == sim.DEFAULT_CAPACITY
    assert engine.time_scale == 1.0
    assert engine.decode_base_s == pytest.approx(sim.CALIBRATION.decode_base_ms / 1000)
    assert engine.cache.capacity_blocks == sim.DEFAULT_CACHE_BLOCKS
    sized = SimEngine.from_spec(
        EngineSpec.model_validate(
            {"kv_cache_gib": 1, "block_size": 32, "kv_bytes_per_token": 1024}
        ),
        instance=0,
    )
    assert sized.cache.capacity_blocks == 2**30 // (32 * 1024)


def test_env_time_scale_overrides_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sim.TIME_SCALE_ENV, "0.001")
    spec = EngineSpec.model_validate({"time_scale": 2.0})
    assert SimEngine.from_spec(spec, instance=0).time_scale == 0.001
    monkeypatch.setenv(sim.TIME_SCALE_ENV, "fast")
    with pytest.raises(ValueError, match=sim.TIME_SCALE_ENV):
        SimEngine.from_spec(spec, instance=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_scael": 1}, "unknown option"),
        ({"decode_base_ms": -1}, "decode_base_ms"),
        ({"block_size": 0}, "block_size"),
        ({"seed": "abc"}, "seed"),
        ({"cache_blocks": 5, "kv_cache_gib": 1}, "not both"),
        ({"prefill_ms_per_token": 1, "prefill_tokens_per_s": 5}, "not both"),
        ({"prefill_tokens_per_s": 0}, "prefill_tokens_per_s"),
        ({"time_scale": True}, "time_scale"),
    ],
)
def test_from_spec_rejects_bad_options(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], message: str
) -> None:
    monkeypatch.delenv(sim.TIME_SCALE_ENV, raising=False)
    with pytest.raises(ValueError, match=message):
        SimEngine.from_spec(EngineSpec.model_validate(options), instance=0)


@given(st.text(min_size=1, max_size=40), st.integers(1, 400))
@settings(max_examples=60, deadline=None)
def test_pseudo_text_for_a_json_items_stage_is_a_json_list(prompt: str, max_tokens: int) -> None:
    """A simulated stage that asks for a JSON list gets one (its pseudo-sentences), as a
    model following the format would write it; prose would fail its framing."""
    import json

    text = sim.as_json_list(pseudo_text(prompt, max_tokens))
    items = json.loads(text)
    assert isinstance(items, list) and all(isinstance(i, str) and i for i in items)


async def test_the_engine_shapes_its_text_by_the_stage_framing(
    make_engine: Callable[..., SimEngine],
) -> None:
    import json

    engine = make_engine(time_scale=0.0)
    listed = await collect(engine.generate("claims of x", GenParams(
        max_tokens=80, tags={"framing": "json_items"})))
    prose = await collect(engine.generate("claims of x", GenParams(max_tokens=80)))
    items = json.loads("".join(d.text for d in listed))
    assert isinstance(items, list) and items
    assert "".join(d.text for d in prose)[0] != "["


async def test_a_requests_sampling_settings_leave_the_text_as_the_docs_say(
    make_engine: Callable[..., SimEngine],
) -> None:
    """QA: the sim's text was the same for seed 1 and seed 2, while docs/API.md listed
    `temperature` and `seed` as used for engine models without saying the sim ignores
    them. The simulator stays deterministic (its calibrated lengths and timings depend on
    the prompt alone); the docs say so."""
    from pathlib import Path

    engine = make_engine()

    async def text(**kw: Any) -> str:
        deltas = await collect(engine.generate("a question", GenParams(max_tokens=64, **kw)))
        return "".join(d.text for d in deltas)

    plain = await text()
    assert plain
    assert await text(temperature=0.7, seed=1) == await text(temperature=0.7, seed=2) == plain
    assert await text(top_p=0.5, seed=3) == plain
    api = " ".join((Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text().split())
    assert ("A model on the `sim` engine ignores `temperature`, `top_p` and `seed`" in api
            and "`seed: 1` and `seed: 2` give the same answer" in api)
