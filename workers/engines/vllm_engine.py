"""The `vllm` engine: vLLM's async engine inside the worker process (GPU; `alto[vllm]`).

Why in-process: the worker then talks to the scheduler directly (no HTTP hop, no second
serialisation of every token), and a cancel is an `abort(request_id)` that frees the
sequence's KV blocks at the next step. For a vLLM that runs elsewhere use the `openai` engine
against `vllm serve`.

vLLM is imported only in `start()`, so this module (and the engine registry) import on
machines without it; building the engine there fails at once with the install hint.

Streaming: requests ask for `RequestOutputKind.DELTA` where vLLM has it (each output carries
only the new text); older vLLMs send cumulative outputs, and `DeltaTracker` turns those into
suffixes. Either way a `Delta` carries exactly the text that is new.

Options: every field of vLLM's `AsyncEngineArgs` (model, gpu_memory_utilization,
max_model_len, tensor_parallel_size, dtype, enforce_eager, max_num_seqs, ...), plus `chat`
(bool, default true: render prompts with the tokenizer's chat template). Defaults that
differ from vLLM's: enable_prefix_caching=True, and max_num_seqs = the spec's capacity when
it is given.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from orchestrator.engine import Delta, GenParams
from orchestrator.spec import EngineSpec
from workers.engines.common import EngineError, chat_messages, plain_prompt

INSTALL_HINT = "pip install 'alto[vllm]'"
DEFAULT_CAPACITY = 256  # vLLM's own default max_num_seqs
_OWN_OPTIONS = frozenset({"chat"})


def vllm_available() -> bool:
    """True when the `vllm` package can be imported (says nothing about a GPU)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise RuntimeError(
            f"the vllm engine needs the vllm package, which is not installed: {INSTALL_HINT} "
            "(on a machine with a supported GPU); for a vLLM server elsewhere use "
            "`kind: openai` with its base_url"
        )


@dataclass(slots=True)
class DeltaTracker:
    """Turns vLLM outputs (delta or cumulative) into new text and running token counts."""

    cumulative: bool
    text: str = ""
    completion_tokens: int = 0

    def update(self, text: str, token_ids: Any) -> str:
        """Feed one output's text and token ids; return the text that is new."""
        n = len(token_ids or ())
        if not self.cumulative:
            self.text += text
            self.completion_tokens += n
            return text
        if not text.startswith(self.text):
            # vLLM never rewrites emitted text; if it did, emitting anything would be wrong
            raise EngineError(
                "vllm engine: cumulative output does not extend the text already streamed"
            )
        new, self.text = text[len(self.text) :], text
        self.completion_tokens = n
        return new


def split_options(options: dict[str, Any], arg_fields: set[str]) -> tuple[dict, dict]:
    """Split a spec's options into (engine-args kwargs, alto's own options); reject the rest."""
    unknown = sorted(set(options) - arg_fields - _OWN_OPTIONS)
    if unknown:
        raise ValueError(
            f"vllm engine: unknown option(s) {unknown}: neither an AsyncEngineArgs field nor "
            f"one of {sorted(_OWN_OPTIONS)}"
        )
    args = {k: v for k, v in options.items() if k in arg_fields}
    own = {k: v for k, v in options.items() if k in _OWN_OPTIONS}
    return args, own


def kv_cache_tokens(llm: Any) -> int | None:
    """Tokens the KV cache of a started vLLM engine holds (num_gpu_blocks x block_size), as
    its CacheConfig reports after profiling: `vllm_config.cache_config` on AsyncLLM (V1),
    `engine.cache_config` on AsyncLLMEngine (V0). None where vLLM does not say."""
    config = getattr(llm, "vllm_config", None) or getattr(llm, "engine", None)
    cache = getattr(config, "cache_config", None)
    blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
    if isinstance(blocks, int) and isinstance(size, int) and blocks > 0 and size > 0:
        return blocks * size
    return None


class VLLMEngine:
    """vLLM's AsyncLLM in this process."""

    def __init__(
        self,
        *,
        model: str,
        name: str = "vllm",
        capacity: int | None = None,
        chat: bool = True,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        require_vllm()
        self.name = name
        self.model = model
        self.chat = chat
        self.capacity = capacity or int((engine_args or {}).get("max_num_seqs") or DEFAULT_CAPACITY)
        self.engine_args: dict[str, Any] = {
            "enable_prefix_caching": True,
            **(engine_args or {}),
            "model": model,
        }
        if capacity is not None:
            self.engine_args.setdefault("max_num_seqs", capacity)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._sampling: Any = None  # (SamplingParams, RequestOutputKind | None)

    @classmethod
    def from_spec(cls, spec: EngineSpec, instance: int = 0) -> VLLMEngine:
        require_vllm()
        opts = spec.options()
        model = spec.model or opts.pop("model", None)
        if not model:
            raise ValueError("vllm engine: `model` is required (a Hugging Face id or a path)")
        chat = opts.pop("chat", True)
        if not isinstance(chat, bool):
            raise ValueError(f"vllm engine option 'chat' must be true or false, got {chat!r}")
        return cls(
            model=str(model),
            name=f"vllm:{model}#{instance}",
            capacity=spec.capacity,
            chat=chat,
            engine_args=opts,
        )

    # -- Engine protocol ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            from vllm import SamplingParams
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as exc:
            raise RuntimeError(f"cannot import vllm ({exc}); {INSTALL_HINT}") from exc
        try:
            from vllm.sampling_params import RequestOutputKind

            delta_kind: Any = RequestOutputKind.DELTA
        except ImportError:  # vLLM < 0.6.2: cumulative outputs only
            delta_kind = None
        try:
            from vllm.v1.engine.async_llm import AsyncLLM as engine_cls
        except ImportError:
            from vllm import AsyncLLMEngine as engine_cls

        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        args, _ = split_options(self.engine_args, fields)
        try:
            self._engine = engine_cls.from_engine_args(AsyncEngineArgs(**args))
        except Exception as exc:
            raise EngineError(f"{self.name}: vLLM failed to start: {exc}") from exc
        self._sampling = (SamplingParams, delta_kind)
        if self.chat:
            tokenizer = self._engine.get_tokenizer()
            if inspect.isawaitable(tokenizer):
                tokenizer = await tokenizer
            if getattr(tokenizer, "chat_template", None):
                self._tokenizer = tokenizer

    @property
    def cache_tokens(self) -> int | None:
        """The prefix-cache size the prompt-aware planner prices misses with
        (workers/router.py announces it in the heartbeat)."""
        return kv_cache_tokens(self._engine) if self._engine is not None else None

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()

    def render(self, prompt: str, params: GenParams) -> str:
        if self._tokenizer is not None and not params.raw:
            return self._tokenizer.apply_chat_template(
                chat_messages(prompt, params), tokenize=False, add_generation_prompt=True
            )
        return plain_prompt(prompt, params)

    async def generate(self, prompt: str, params: GenParams) -> AsyncIterator[Delta]:
        if self._engine is None:
            await self.start()
        sampling_cls, delta_kind = self._sampling
        kwargs: dict[str, Any] = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stop": list(params.stop) if params.stop else None,
        }
        if params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if delta_kind is not None:
            kwargs["output_kind"] = delta_kind
        sampling = sampling_cls(**kwargs)
        request_id = f"{self.name}-{uuid.uuid4().hex}"
        tracker = DeltaTracker(cumulative=delta_kind is None)
        stream = self._engine.generate(self.render(prompt, params), sampling, request_id)
        finished = False
        try:
            async for out in stream:
                completion = out.outputs[0]
                new = tracker.update(completion.text, completion.token_ids)
                if out.finished:
                    finished = True
                    yield Delta(
                        new,
                        prompt_tokens=len(out.prompt_token_ids or ()),
                        completion_tokens=tracker.completion_tokens,
                        cached_tokens=getattr(out, "num_cached_tokens", None),
                        finish_reason=completion.finish_reason or "stop",
                    )
                    return
                if new:
                    yield Delta(new)
        finally:
            await stream.aclose()
            if not finished and self._engine is not None:
                # closing vLLM's generator aborts too; an explicit abort of a finished or
                # unknown id is a no-op, so this is belt and braces for older versions
                await self._engine.abort(request_id)
