"""The `sim` engine: one simulated GPU instance running continuous batching, like vLLM.

Why it exists: benchmarks and tests need an engine whose *timing* behaves like a real
serving engine (batching makes each step slower but raises throughput, long prompts stall
everyone for a step, shared prefixes are cheaper, a full engine queues) while its *text* is
deterministic and free. It is never the only engine a feature works with.

Timing model (all durations are simulated seconds; each step really sleeps
``step_s * time_scale`` so benchmarks can compress time, and the simulated value is
recorded in `SimEngine.step_log`)::

    step_s = decode_base_s + decode_per_seq_s * B + prefill_s_per_token * U

    B  = sequences that produce a token in this step (all running sequences after admission)
    U  = uncached prompt tokens of the sequences admitted in this step

- Admission happens at the start of each step, FIFO from the waiting queue, while
  ``running < capacity`` and the step's prefill tokens stay within ``max_prefill_tokens``
  (the first admission of a step is always allowed, so a huge prompt cannot starve).
  No chunked prefill: a long prompt makes its whole step long, as in vLLM without it.
- Every running sequence gets exactly one output token per step; a newly admitted sequence
  gets its first token at the end of its prefill step. A request with ``n`` output tokens
  holds its slot for ``max(n, 1)`` steps (an empty answer still costs one step: its EOS).
- Sequences leave the batch when they finish or when their consumer cancels; the freed slot
  is refilled at the next step.

Prefix cache (vLLM-style automatic prefix caching)::

    key_0 = H(root, tokens[0:bs]),  key_i = H(key_{i-1}, tokens[i*bs:(i+1)*bs])   (full blocks)
    cached_tokens = bs * (number of leading blocks whose key is cached),
                    at most floor((P - 1) / bs) blocks, so >= 1 prompt token is always computed
    U_request     = P - cached_tokens

An LRU holds at most ``cache_blocks`` keys. A request looks its blocks up when admitted
(touching the hits) and inserts all of its full prompt blocks after its prefill step.
Blocks are touched tail-first, so eviction takes a prompt's *last* blocks first and a
shared head survives longest (vLLM frees a request's blocks in reverse order for the same
reason). Simplifications: running sequences do not pin their blocks, generated tokens are not
cached, and two requests admitted in the same step do not hit on each other (as in vLLM,
whose blocks become reusable only once computed).

Text comes from a *responder*: ``params.tags["responder"]`` may be a callable
``(prompt, params) -> str`` (or a ``"package.module:function"`` string naming one);
otherwise a pseudo-text generator seeded by the prompt's hash is used, whose length is drawn
from ``[min_tokens, max_tokens]``: below ``min_tokens`` the cap cuts every such answer to
``max_tokens`` tokens (finish "length"). Output is cut at the first `params.stop` string
(finish "stop") and at ``max_tokens`` tokens (finish "length").
Sampling temperature is ignored: the simulator is deterministic by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import math
import os
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from orchestrator.engine import Delta, GenParams
from orchestrator.spec import EngineSpec
from workers.engines.tokens import tokenize

Responder = Callable[[str, GenParams], str]
Sleeper = Callable[[float], Awaitable[Any]]

# ------------------------------------------------------------------------------------------
# CALIBRATION
#
# Model / GPU: Llama-3(.1)-8B-Instruct, BF16, one NVIDIA H100-80GB-SXM, vLLM v0.6.0 with
# num-scheduler-steps=10 (published September 2024 by Lambda).
#
# [A] Raw per-request timings, 10 ShareGPT prompts sent at once to `benchmark_serving.py`:
#     https://github.com/LambdaLabsML/vllm-benchmark/blob/a4f9f4371a1ccac781293837fce2bce0cc6d25cc/
#       results/prompt_10/1xH100-80GB-SXM/Meta-Llama-3-8B-Instruct_tp1_len2048.json
#     Tokens stream in chunks of 10 (one chunk per 10 scheduler steps), so ITL / 10 = 1 step.
#       - longest request (741 output tokens) decoding alone at the end: ITL 70.4-70.9 ms
#         -> 7.05 ms per decode step at batch 1
#       - first chunk, all 10 requests decoding: ITL 75.2-75.4 ms -> 7.53 ms per step at batch 10
#       - all 10 prompts (1369 prompt tokens in total) prefilled in one step: median TTFT 62.19 ms
# [B] Saturated throughput, same GPU / model / vLLM, ShareGPT, rps=inf, 5000 prompts,
#     max-num-seqs=256 (so B = 256 in steady state), table "Llama 3.1 8B" in
#     https://github.com/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md
#       - v0.6.0, 10 scheduler steps: output throughput 8088.35 tok/s, median TPOT 25.57 ms
# [C] ShareGPT request shape under `benchmark_serving.py` with the Llama-3 tokenizer,
#     https://github.com/vllm-project/vllm/issues/7567 (1000 prompts):
#       - 215196 input tokens and 178793 generated tokens -> 215.2 in / 178.8 out per request
#
# Derivation (x = decode_per_seq_ms, b = decode_base_ms, p = prefill_ms_per_token):
#   [A] batch 1:           b + x = 7.05                      -> b = 7.05 - x
#   [A] prefill step:      b + 10x + 1369 p ~= 62.19           -> p = (62.19 - b - 10x) / 1369
#       (TTFT also holds HTTP and tokenisation time, so p is a slight over-estimate)
#   [B]+[C] one second of a saturated engine:
#       steps/s          S = 8088.35 / 256               = 31.60
#       prefill tokens/s P = 8088.35 / 178.8 * 215.2     = 9735
#       1000 ms = S * (b + 256 x) + P * p
#   Solving the three together gives x = 0.0482 ms, b = 7.002 ms, p = 0.0400 ms
#   (prefill ~= 25,000 tok/s). Check against the one point not used: [A] batch 10 predicts
#   b + 10 x = 7.48 ms per step vs 7.53 ms measured. `_calibrate()` below does exactly
#   this arithmetic and tests/test_sim_engine.py re-checks it.
#
# KV cache size (an estimate, not a measurement): Llama-3-8B has 32 layers, 8 KV heads of
# dim 128, BF16 -> 2 * 32 * 8 * 128 * 2 B = 128 KiB per token. An 80 GB H100 at vLLM's
# default gpu_memory_utilization=0.9 gives ~71.6 GiB, minus ~15 GiB of weights and a few GiB
# of activations / CUDA graphs -> ~52 GiB of KV cache = 52 GiB / (16 * 128 KiB) = 26,624
# blocks of 16 tokens (~426k tokens).
# ------------------------------------------------------------------------------------------

CALIBRATION_SOURCE = (
    "Llama-3.1-8B BF16 on 1x H100-80GB-SXM, vLLM v0.6.0 (LambdaLabsML/vllm-benchmark, 2024-09)"
)
_A_STEP_MS_BATCH1 = 70.5 / 10
_A_STEP_MS_BATCH10 = 75.3 / 10
_A_PREFILL_TOKENS = 1369
_A_PREFILL_BATCH = 10
_A_TTFT_MS = 62.19
_B_OUTPUT_TOK_S = 8088.35
_B_BATCH = 256
_C_INPUT_PER_REQ = 215196 / 1000
_C_OUTPUT_PER_REQ = 178793 / 1000


@dataclass(frozen=True, slots=True)
class Calibration:
    decode_base_ms: float
    decode_per_seq_ms: float
    prefill_ms_per_token: float


def _calibrate() -> Calibration:
    """Solve the three published figures above for (b, x, p); see the CALIBRATION block."""
    steps_per_s = _B_OUTPUT_TOK_S / _B_BATCH
    prefill_tok_per_s = _B_OUTPUT_TOK_S / _C_OUTPUT_PER_REQ * _C_INPUT_PER_REQ
    n, k = _A_PREFILL_TOKENS, _A_PREFILL_BATCH
    # b = s1 - x ; p = (ttft - b - k x) / n = (ttft - s1 - (k - 1) x) / n
    # 1000 = S (b + B x) + P p  -> linear in x
    s1 = _A_STEP_MS_BATCH1
    const = steps_per_s * s1 + prefill_tok_per_s * (_A_TTFT_MS - s1) / n
    slope = steps_per_s * (_B_BATCH - 1) - prefill_tok_per_s * (k - 1) / n
    x = (1000.0 - const) / slope
    b = s1 - x
    p = (_A_TTFT_MS - b - k * x) / n
    return Calibration(decode_base_ms=b, decode_per_seq_ms=x, prefill_ms_per_token=p)


CALIBRATION = _calibrate()
DEFAULT_DECODE_BASE_S = CALIBRATION.decode_base_ms / 1000
DEFAULT_DECODE_PER_SEQ_S = CALIBRATION.decode_per_seq_ms / 1000
DEFAULT_PREFILL_S_PER_TOKEN = CALIBRATION.prefill_ms_per_token / 1000

DEFAULT_MODEL = "llama-3.1-8b@h100"
DEFAULT_CAPACITY = 64
DEFAULT_BLOCK_SIZE = 16
DEFAULT_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
DEFAULT_KV_CACHE_GIB = 52.0
DEFAULT_MAX_PREFILL_TOKENS = 8192
DEFAULT_MIN_TOKENS = 16
TIME_SCALE_ENV = "ALTO_SIM_TIME_SCALE"


def cache_blocks_for(kv_cache_gib: float, block_size: int, kv_bytes_per_token: int) -> int:
    """How many `block_size`-token blocks fit in a KV cache of `kv_cache_gib` GiB."""
    return max(1, int(kv_cache_gib * 2**30 // (block_size * kv_bytes_per_token)))


DEFAULT_CACHE_BLOCKS = cache_blocks_for(
    DEFAULT_KV_CACHE_GIB, DEFAULT_BLOCK_SIZE, DEFAULT_KV_BYTES_PER_TOKEN
)


# ------------------------------------------------------------------------------------------
# Prefix cache
# ------------------------------------------------------------------------------------------


class PrefixCache:
    """LRU over hash-chained token blocks (vLLM automatic prefix caching, simplified).

    A block's key hashes its parent's key with its own tokens, so a key stands for the
    whole prefix up to that block and equal keys mean equal prefixes.
    """

    _ROOT = b"alto-sim-prefix-root"

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if capacity_blocks < 0:
            raise ValueError("cache_blocks must be >= 0")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def block_keys(self, tokens: Sequence[str]) -> list[bytes]:
        """Chain keys of the full blocks of `tokens` (a partial last block has no key)."""
        keys: list[bytes] = []
        prev = self._ROOT
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            h = hashlib.blake2b(prev, digest_size=16)
            for tok in tokens[start : start + bs]:
                raw = tok.encode("utf-8", "surrogatepass")
                h.update(len(raw).to_bytes(4, "little"))
                h.update(raw)
            prev = h.digest()
            keys.append(prev)
        return keys

    @staticmethod
    def max_hit_blocks(prompt_tokens: int, block_size: int) -> int:
        """Hits are capped so at least one prompt token is computed (it yields the logits)."""
        return (prompt_tokens - 1) // block_size if prompt_tokens > 0 else 0

    def peek_keys(self, keys: Sequence[bytes], max_blocks: int) -> int:
        """Number of leading cached blocks, without touching the LRU."""
        hits = 0
        for key in keys[:max_blocks]:
            if key not in self._lru:
                break
            hits += 1
        return hits

    def match_keys(self, keys: Sequence[bytes], max_blocks: int) -> int:
        """Like `peek_keys`, and mark the hit blocks recently used (tail first)."""
        hits = self.peek_keys(keys, max_blocks)
        for key in reversed(keys[:hits]):
            self._lru.move_to_end(key)
        return hits

    def insert_keys(self, keys: Sequence[bytes]) -> None:
        """Add or refresh blocks tail first, so the head is most recent and evicted last."""
        if self.capacity_blocks == 0:
            return
        for key in reversed(keys):
            if key in self._lru:
                self._lru.move_to_end(key)
                continue
            self._lru[key] = None
            while len(self._lru) > self.capacity_blocks:
                self._lru.popitem(last=False)
                self.evictions += 1

    # token-level conveniences (tests, tools) ----------------------------------------------
    def match(self, tokens: Sequence[str]) -> int:
        """Cached prefix length in tokens for a prompt about to be prefilled (touches hits)."""
        hits = self.match_keys(
            self.block_keys(tokens), self.max_hit_blocks(len(tokens), self.block_size)
        )
        return hits * self.block_size

    def insert(self, tokens: Sequence[str]) -> None:
        self.insert_keys(self.block_keys(tokens))


# ------------------------------------------------------------------------------------------
# Default responder
# ------------------------------------------------------------------------------------------

_WORD_TEXT = (
    "the system model stage claim query result value data source answer evidence report "
    "token stream output input request batch cache prefix engine worker latency throughput "
    "first second third final simple clear exact fast small large new old good open "
    "shows uses reads writes finds checks makes gives keeps sends returns needs "
    "and but or so because while when if then also only still just often "
    "in on at by for with from into over under about after before between"
)
_WORDS = _WORD_TEXT.split()


def _seed_for(*parts: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return int.from_bytes(h.digest(), "little")


def pseudo_text(prompt: str, max_tokens: int, *, seed: int = 0, min_tokens: int = 16) -> str:
    """Deterministic sentences whose token count is drawn from [min_tokens, max_tokens].

    The same (prompt, seed) always gives the same word sequence (the length is drawn from
    a separate stream), so `max_tokens` only moves where it stops, apart from the final
    full stop. The result tokenizes to exactly the drawn count.
    """
    length_rng = random.Random(_seed_for("length", str(seed), prompt))
    words = random.Random(_seed_for("words", str(seed), prompt))
    lo = min(min_tokens, max_tokens)
    n = length_rng.randint(lo, max_tokens) if max_tokens > 0 else 0
    toks: list[str] = []
    sentence_left = words.randint(6, 14)
    start = True
    while len(toks) < n - 1:
        if sentence_left == 0:
            toks.append(".")
            sentence_left = words.randint(6, 14)
            start = True
            continue
        word = words.choice(_WORDS)
        word = word.capitalize() if start else word
        toks.append(" " + word if toks else word)
        start = False
        sentence_left -= 1
    if n >= 1:
        # end on a full stop, unless that would make two in a row or the text is one token
        if toks and toks[-1] != ".":
            toks.append(".")
        else:
            word = words.choice(_WORDS).capitalize()
            toks.append(" " + word if toks else word)
    return "".join(toks)


def as_json_list(text: str) -> str:
    """Pseudo-text in the shape a `json_items` stage asks its model for: its sentences as a
    JSON list of strings, as a model following the format would write them. Without it a
    simulated stage of that framing writes prose, which the framing refuses (a model that
    ignored the format)."""
    sentences = [s.strip() + "." for s in text.split(".") if s.strip()]
    return json.dumps(sentences)


def resolve_responder(value: Any) -> Responder | None:
    """A responder from `params.tags["responder"]`: a callable or 'package.module:name'."""
    if value is None:
        return None
    if isinstance(value, str):
        module_name, sep, attr = value.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"responder {value!r} must look like 'package.module:function'")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        value = obj
    if not callable(value):
        raise TypeError(f"responder must be callable (prompt, params) -> str, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------
# Engine
# ------------------------------------------------------------------------------------------


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One simulated engine step, for benchmarks and for tests of the timing formula."""

    index: int
    start_s: float  # simulated clock when the step began
    batch_size: int  # sequences that produced a token (B)
    admitted: int  # sequences whose prefill ran in this step
    prefill_tokens: int  # uncached prompt tokens computed in this step (U)
    duration_s: float  # simulated duration (not scaled by time_scale)


@dataclass(eq=False, slots=True)
class _Seq:
    id: int
    prompt_tokens: int
    block_keys: list[bytes]
    out_tokens: list[str]
    finish_reason: str
    out: asyncio.Queue[Delta | _Failure]
    state: _State = _State.QUEUED
    cached_tokens: int = 0
    emitted: int = 0
    submitted_s: float = 0.0
    first_token_s: float | None = None


class _Stream:
    """The async iterator `generate` returns.

    A class rather than an async generator so the request is queued the moment `generate`
    is called (deterministic batch composition) and is aborted even if it is closed or
    dropped before its first `__anext__`.
    """

    def __init__(self, engine: SimEngine, seq: _Seq) -> None:
        self._engine = engine
        self._seq = seq
        self._done = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._seq.out.get()
        except BaseException:
            # the consumer was cancelled while waiting: the request is abandoned
            self._abort()
            raise
        if isinstance(item, _Failure):
            self._done = True
            raise RuntimeError(f"sim engine {self._engine.name}: {item.error}") from item.error
        if item.finish_reason is not None:
            self._done = True
        return item

    async def aclose(self) -> None:
        self._abort()

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel(self._seq)

    def __del__(self) -> None:
        if not self._done:
            with contextlib.suppress(Exception):
                self._engine._cancel(self._seq)


class SimEngine:
    """One simulated GPU instance; see the module docstring for the model."""

    def __init__(
        self,
        *,
        name: str = "sim",
        capacity: int = DEFAULT_CAPACITY,
        decode_base_s: float = DEFAULT_DECODE_BASE_S,
        decode_per_seq_s: float = DEFAULT_DECODE_PER_SEQ_S,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        block_size: int = DEFAULT_BLOCK_SIZE,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
        max_prefill_tokens: int | None = DEFAULT_MAX_PREFILL_TOKENS,
        time_scale: float = 1.0,
        seed: int = 0,
        min_tokens: int = DEFAULT_MIN_TOKENS,
        sleep: Sleeper | None = None,
        step_log_size: int = 10_000,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        for label, v in (
            ("decode_base_s", decode_base_s),
            ("decode_per_seq_s", decode_per_seq_s),
            ("prefill_s_per_token", prefill_s_per_token),
            ("time_scale", time_scale),
        ):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{label} must be a finite number >= 0, got {v!r}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1 (or None for no limit)")
        if min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        self.name = name
        self.capacity = capacity
        self.decode_base_s = decode_base_s
        self.decode_per_seq_s = decode_per_seq_s
        self.prefill_s_per_token = prefill_s_per_token
        self.max_prefill_tokens = max_prefill_tokens
        self.time_scale = time_scale
        self.seed = seed
        self.min_tokens = min_tokens
        self.cache = PrefixCache(block_size, cache_blocks)
        self._sleep: Sleeper = sleep if sleep is not None else asyncio.sleep
        self._queue: deque[_Seq] = deque()
        self._running: dict[int, _Seq] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed = False
        self._next_id = 0
        self.step_log: deque[StepRecord] = deque(maxlen=step_log_size)
        # counters (requests: accepted; token counters: over admitted requests)
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.sim_time_s = 0.0
        # simulated time to first token per request, counted from the start of the step that
        # was in flight when the request arrived (the sim clock advances only at step ends)
        self.ttft_s: deque[float] = deque(maxlen=step_log_size)

    # -- construction from a pipeline spec --------------------------------------------------
    @classmethod
    def from_spec(cls, spec: EngineSpec, instance: int = 0) -> SimEngine:
        """Build instance `instance` of a `kind: sim` engine; options come from the spec's
        extra fields, and ALTO_SIM_TIME_SCALE (read here, once) overrides `time_scale`."""
        opts = spec.options()
        unknown = sorted(set(opts) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"sim engine: unknown option(s) {unknown}; known options: {sorted(_OPTIONS)}"
            )
        if "prefill_ms_per_token" in opts and "prefill_tokens_per_s" in opts:
            raise ValueError(
                "sim engine: give prefill_ms_per_token or prefill_tokens_per_s, not both"
            )
        if "cache_blocks" in opts and "kv_cache_gib" in opts:
            raise ValueError("sim engine: give cache_blocks or kv_cache_gib, not both")

        block_size = _opt_int(opts, "block_size", DEFAULT_BLOCK_SIZE, minimum=1)
        if "cache_blocks" in opts:
            cache_blocks = _opt_int(opts, "cache_blocks", 0, minimum=0)
        else:
            cache_blocks = cache_blocks_for(
                _opt_float(opts, "kv_cache_gib", DEFAULT_KV_CACHE_GIB),
                block_size,
                _opt_int(opts, "kv_bytes_per_token", DEFAULT_KV_BYTES_PER_TOKEN, minimum=1),
            )
        if "prefill_tokens_per_s" in opts:
            rate = _opt_float(opts, "prefill_tokens_per_s", 1.0)
            if rate <= 0:
                raise ValueError("sim engine option 'prefill_tokens_per_s' must be > 0")
            prefill_s = 1.0 / rate
        else:
            prefill_s = (
                _opt_float(opts, "prefill_ms_per_token", CALIBRATION.prefill_ms_per_token) / 1000
            )
        env = os.environ.get(TIME_SCALE_ENV)
        if env is not None and env.strip():
            try:
                time_scale = float(env)
            except ValueError:
                raise ValueError(f"{TIME_SCALE_ENV}={env!r} is not a number") from None
            if not math.isfinite(time_scale) or time_scale < 0:
                raise ValueError(f"{TIME_SCALE_ENV}={env!r} must be a finite number >= 0")
        else:
            time_scale = _opt_float(opts, "time_scale", 1.0)
        max_prefill: int | None = DEFAULT_MAX_PREFILL_TOKENS
        if "max_prefill_tokens" in opts:
            max_prefill = (
                None
                if opts["max_prefill_tokens"] is None
                else _opt_int(opts, "max_prefill_tokens", 1, minimum=1)
            )
        return cls(
            name=f"sim:{spec.model or DEFAULT_MODEL}#{instance}",
            capacity=spec.capacity or DEFAULT_CAPACITY,
            decode_base_s=_opt_float(opts, "decode_base_ms", CALIBRATION.decode_base_ms) / 1000,
            decode_per_seq_s=(
                _opt_float(opts, "decode_per_seq_ms", CALIBRATION.decode_per_seq_ms) / 1000
            ),
            prefill_s_per_token=prefill_s,
            block_size=block_size,
            cache_blocks=cache_blocks,
            max_prefill_tokens=max_prefill,
            time_scale=time_scale,
            seed=_opt_int(opts, "seed", 0),
            min_tokens=_opt_int(opts, "min_tokens", DEFAULT_MIN_TOKENS, minimum=0),
        )

    # -- Engine protocol ---------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to load; the step loop starts lazily with the first request."""
        if self._closed:
            raise RuntimeError(f"sim engine {self.name} is closed")

    def generate(self, prompt: str, params: GenParams) -> AsyncIterator[Delta]:
        """Queue a request now and return its delta stream (needs a running event loop).

        Closing the stream, or cancelling the task waiting on it, aborts the request and
        frees its slot.
        """
        if self._closed:
            raise RuntimeError(f"sim engine {self.name} is closed")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        loop = asyncio.get_running_loop()
        responder = resolve_responder(params.tags.get("responder"))
        capped = False
        if responder is None:
            # its length is drawn from min_tokens up, capped at max_tokens: below min_tokens
            # every answer was cut short (told apart here: the draws stay as they are)
            capped = params.max_tokens < self.min_tokens
            text = pseudo_text(
                _full_prompt(prompt, params),
                params.max_tokens,
                seed=self.seed,
                min_tokens=self.min_tokens,
            )
            if params.tags.get("framing") == "json_items":
                text = as_json_list(text)
        else:
            text = responder(prompt, params)
            if not isinstance(text, str):
                raise TypeError(f"responder returned {type(text).__name__}, expected str")
        out_tokens, finish = _shape_output(text, params, capped=capped)
        prompt_toks = tokenize(_full_prompt(prompt, params))
        seq = _Seq(
            id=self._next_id,
            prompt_tokens=len(prompt_toks),
            block_keys=self.cache.block_keys(prompt_toks),
            out_tokens=out_tokens,
            finish_reason=finish,
            out=asyncio.Queue(),
            submitted_s=self.sim_time_s,
        )
        self._next_id += 1
        self._queue.append(seq)
        self.requests += 1
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=f"{self.name}-steps")
        self._wake.set()
        self._notify()
        return _Stream(self, seq)

    async def aclose(self) -> None:
        """Stop the step loop; streams still open end with a RuntimeError."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._abort_all(RuntimeError("engine closed"))

    # -- observation -------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def load(self) -> int:
        """Requests this instance holds (running + waiting), for load-aware schedulers."""
        return len(self._running) + len(self._queue)

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def step_duration(self, batch_size: int, prefill_tokens: int) -> float:
        """The timing formula, in simulated seconds."""
        return (
            self.decode_base_s
            + self.decode_per_seq_s * batch_size
            + self.prefill_s_per_token * prefill_tokens
        )

    def stats(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "running": self.running,
            "queued": self.queued,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefix_hit_rate": self.prefix_hit_rate,
            "completion_tokens": self.completion_tokens,
            "steps": self.steps,
            "sim_time_s": self.sim_time_s,
            "cache_blocks_used": len(self.cache),
            "cache_evictions": self.cache.evictions,
        }

    async def wait_until(
        self, predicate: Callable[[SimEngine], bool], timeout: float = 10.0
    ) -> None:
        """Wait until `predicate(self)` holds; it is re-checked after every state change."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    # -- internals ---------------------------------------------------------------------------
    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _cancel(self, seq: _Seq) -> None:
        if seq.state is _State.QUEUED:
            self._queue.remove(seq)
        elif seq.state is _State.RUNNING:
            del self._running[seq.id]
        else:
            return
        seq.state = _State.CANCELLED
        self.cancelled += 1
        self._notify()

    def _abort_all(self, error: BaseException) -> None:
        for seq in [*self._queue, *self._running.values()]:
            seq.state = _State.ABORTED
            seq.out.put_nowait(_Failure(error))
        self._queue.clear()
        self._running.clear()
        self._notify()

    def _admit(self) -> list[_Seq]:
        admitted: list[_Seq] = []
        budget = self.max_prefill_tokens
        used = 0
        bs = self.cache.block_size
        while self._queue and len(self._running) < self.capacity:
            seq = self._queue[0]
            max_blocks = PrefixCache.max_hit_blocks(seq.prompt_tokens, bs)
            need = seq.prompt_tokens - bs * self.cache.peek_keys(seq.block_keys, max_blocks)
            if admitted and budget is not None and used + need > budget:
                break
            self._queue.popleft()
            seq.cached_tokens = bs * self.cache.match_keys(seq.block_keys, max_blocks)
            seq.state = _State.RUNNING
            self._running[seq.id] = seq
            used += need
            self.prompt_tokens += seq.prompt_tokens
            self.cached_tokens += seq.cached_tokens
            admitted.append(seq)
        return admitted

    def _emit(self, seq: _Seq) -> None:
        total = len(seq.out_tokens)
        text = seq.out_tokens[seq.emitted] if seq.emitted < total else ""
        if seq.emitted < total:
            self.completion_tokens += 1
        seq.emitted += 1
        if seq.first_token_s is None:
            seq.first_token_s = self.sim_time_s
            self.ttft_s.append(self.sim_time_s - seq.submitted_s)
        if seq.emitted >= max(total, 1):
            seq.state = _State.DONE
            del self._running[seq.id]
            self.completed += 1
            seq.out.put_nowait(
                Delta(
                    text,
                    prompt_tokens=seq.prompt_tokens,
                    completion_tokens=total,
                    cached_tokens=seq.cached_tokens,
                    finish_reason=seq.finish_reason,
                )
            )
        else:
            seq.out.put_nowait(Delta(text))

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue and not self._running:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                admitted = self._admit()
                batch = list(self._running.values())
                prefill = sum(s.prompt_tokens - s.cached_tokens for s in admitted)
                duration = self.step_duration(len(batch), prefill)
                self.step_log.append(
                    StepRecord(
                        index=self.steps,
                        start_s=self.sim_time_s,
                        batch_size=len(batch),
                        admitted=len(admitted),
                        prefill_tokens=prefill,
                        duration_s=duration,
                    )
                )
                self.steps += 1
                self._notify()
                await self._sleep(duration * self.time_scale)
                self.sim_time_s += duration
                # prefill ran whether or not the request was cancelled meanwhile
                for seq in admitted:
                    self.cache.insert_keys(seq.block_keys)
                for seq in batch:
                    if seq.state is _State.RUNNING:
                        self._emit(seq)
                self._notify()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a broken sleeper must not hang every consumer
            self._abort_all(exc)
            raise


def _full_prompt(prompt: str, params: GenParams) -> str:
    return f"{params.system}\n\n{prompt}" if params.system else prompt


def _shape_output(
    text: str, params: GenParams, *, capped: bool = False
) -> tuple[list[str], str]:
    """Apply stop strings, then max_tokens; return (tokens, finish_reason). `capped`: the
    text already ends where max_tokens cut it ("length", unless a stop string comes first)."""
    finish = "length" if capped else "stop"
    if params.stop:
        cuts = [i for i in (text.find(s) for s in params.stop if s) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
            finish = "stop"
    tokens = tokenize(text)
    if len(tokens) > params.max_tokens:
        tokens = tokens[: params.max_tokens]
        finish = "length"
    return tokens, finish


_OPTIONS = frozenset(
    {
        "time_scale",
        "decode_base_ms",
        "decode_per_seq_ms",
        "prefill_ms_per_token",
        "prefill_tokens_per_s",
        "block_size",
        "cache_blocks",
        "kv_cache_gib",
        "kv_bytes_per_token",
        "max_prefill_tokens",
        "seed",
        "min_tokens",
    }
)


def _opt_float(opts: dict[str, Any], key: str, default: float) -> float:
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"sim engine option {key!r} must be a number, got {value!r}")
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"sim engine option {key!r} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"sim engine option {key!r} must be a finite number >= 0, got {value!r}")
    return out


def _opt_int(opts: dict[str, Any], key: str, default: int, *, minimum: int | None = None) -> int:
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"sim engine option {key!r} must be an integer, got {value!r}")
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"sim engine option {key!r} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"sim engine option {key!r} must be >= {minimum}, got {value!r}")
    return out
