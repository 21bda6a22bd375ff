"""Pipeline specification: YAML in, validated pydantic models out.

A spec is checked once, at load, so that every mistake a user can make in YAML
(unknown stage in `to:`, a cycle, an aggregation scope that does not enclose the
stage) fails with the stage and the field named, instead of hanging a run later.
The graph facts the runtime needs (successors, credit flow per stage, which stage
keys an aggregation) are computed here once and cached on the model.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.template import BUILTIN_VARS, ambiguous

REQUEST = "request"
StageKind = Literal["lm", "tool", "reduce"]
Framing = Literal["lines", "json_items", "sentences", "whole", "items"]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")


class SpecError(ValueError):
    """A pipeline spec is invalid; the message names the stage and the field."""

    def __init__(self, message: str, *, stage: str | None = None, field: str | None = None):
        where = ".".join(p for p in (f"stages.{stage}" if stage else None, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.stage = stage
        self.field = field


class EngineSpec(BaseModel):
    """One engine a pipeline's LM stages can use; `kind` picks the implementation."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["sim", "openai", "local", "vllm"] = "sim"
    model: str | None = None
    instances: int = Field(default=1, ge=1, le=256)
    capacity: int | None = Field(default=None, ge=1)

    def options(self) -> dict[str, Any]:
        """Engine-specific settings (everything not common to all kinds)."""
        return dict(self.model_extra or {})


# fields only an lm stage reads: set on a tool or reduce stage, they would do nothing
_LM_ONLY = ("engine", "prompt", "system", "max_tokens", "temperature", "stop", "responder",
            "policy")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: StageKind
    engine: str | None = None
    prompt: str | None = None
    system: str | None = None
    function: str | None = None
    framing: Framing = "whole"
    to: list[str] = Field(default_factory=list)
    aggregate_by: list[str] | None = None
    streaming: bool | None = None
    max_tokens: int = Field(default=256, ge=1, le=65536)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    partitions: int = Field(default=4, ge=1, le=1024)
    # runner slots per instance; unset = the engine's capacity (LM) or 8 (tools, reducers)
    concurrency: int | None = Field(default=None, ge=1, le=4096)
    policy: Literal["pull", "round_robin", "least_loaded", "cache_aware", "prompt_aware"] = "pull"
    responder: str | None = None
    stop: list[str] | None = None
    # seconds one call (an LM generation, a tool or reducer call) may take; past it the
    # run fails with code `stage_timeout`. Unset: no limit of the stage's own (the run's
    # deadline still ends it)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    # how often a failed call (it raised, or ran past timeout_s) is tried again, on the same
    # worker, before its run fails; only while the call has published nothing (a retry
    # after published units could continue them differently). Waits retry_backoff_s
    # before the first retry, doubling each time (at most 60 s)
    retries: int = Field(default=0, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)
    # settings of a tool/reduce function, a copy per call as ctx.params (e.g. a search's top_k)
    params: dict[str, Any] = Field(default_factory=dict)
    # at most this many units per call: the call is stopped after the last one (an engine
    # request is aborted), so a runaway list (a small model repeating itself) cannot flood
    # every stage after it; and `unique` drops a unit equal to an earlier one of the same
    # call (not counted against max_units)
    max_units: int | None = Field(default=None, ge=1, le=100_000)
    unique: bool = False

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v) or v == REQUEST:
            raise ValueError(f"invalid stage name {v!r} (letters, digits, _ and -; not 'request')")
        if v in BUILTIN_VARS:
            # a stage's units are templates' `{name}`: this one would hide the built-in
            raise ValueError(f"stage name {v!r} is reserved: {{{v}}} in a prompt means the "
                             f"built-in value, which a stage of that name would hide")
        return v

    @field_validator("to", "stop", mode="before")
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        # one string is a one-element list, as the OpenAI API takes `"stop": "."`
        return [v] if isinstance(v, str) else v

    @property
    def aggregates(self) -> bool:
        return self.aggregate_by is not None

    @property
    def scope(self) -> list[str]:
        """Ancestor stages whose unit index is part of the aggregation key (outer to inner)."""
        return [s for s in (self.aggregate_by or []) if s != REQUEST]


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    streaming: bool = True
    entry: str | None = None
    output: str | None = None
    engines: dict[str, EngineSpec] = Field(default_factory=lambda: {"default": EngineSpec()})
    stages: list[StageSpec]
    # a run's input must hold some non-blank text: refused at the door (400 `empty_input`,
    # `alto run` exit 2) instead of run, where a model given nothing answers from its
    # prompt's worked example
    input_required: bool = False

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"invalid pipeline name {v!r}")
        return v

    @model_validator(mode="after")
    def _graph(self) -> PipelineSpec:
        _validate_graph(self)
        return self

    # ----- graph facts, computed once -----------------------------------------------------
    @cached_property
    def by_name(self) -> dict[str, StageSpec]:
        return {s.name: s for s in self.stages}

    def stage(self, name: str) -> StageSpec:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"pipeline {self.name!r} has no stage {name!r}") from None

    @cached_property
    def entry_stage(self) -> str:
        return self.entry or self.stages[0].name

    @cached_property
    def sinks(self) -> list[str]:
        return [s.name for s in self.stages if not s.to]

    @cached_property
    def output_stage(self) -> str:
        return self.output or self.sinks[0]

    @cached_property
    def predecessors(self) -> dict[str, list[str]]:
        preds: dict[str, list[str]] = {s.name: [] for s in self.stages}
        for s in self.stages:
            for t in s.to:
                preds[t].append(s.name)
        return preds

    @cached_property
    def topo_order(self) -> list[str]:
        return _topo(self)

    @cached_property
    def flow(self) -> dict[str, Fraction]:
        """Credit that passes through each stage over a whole run.

        Every stage splits what it receives evenly over its successors (units and the
        end marker alike), so the total along each edge is fixed by the graph alone.
        A stage has seen all of a run when the credit it processed reaches this value.
        """
        flow = {name: Fraction(0) for name in self.by_name}
        flow[self.entry_stage] = Fraction(1)
        for name in self.topo_order:
            succ = self.by_name[name].to
            for t in succ:
                flow[t] += flow[name] / len(succ)
        return flow

    def streaming_for(self, stage: str) -> bool:
        s = self.stage(stage)
        return self.streaming if s.streaming is None else s.streaming

    def engine_for(self, stage: str) -> EngineSpec:
        s = self.stage(stage)
        return self.engines[s.engine or "default"]


def _topo(p: PipelineSpec) -> list[str]:
    indeg = {s.name: 0 for s in p.stages}
    for s in p.stages:
        for t in s.to:
            indeg[t] += 1
    ready = [n for n, d in indeg.items() if d == 0]
    order: list[str] = []
    by = {s.name: s for s in p.stages}
    while ready:
        n = ready.pop(0)
        order.append(n)
        for t in by[n].to:
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
    return order


def _reachable(by: dict[str, StageSpec], start: list[str], removed: str | None) -> set[str]:
    seen: set[str] = set()
    todo = [s for s in start if s != removed]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(t for t in by[n].to if t != removed)
    return seen


def _bad_base_url(value: Any) -> str | None:
    """Why an `openai` engine's `base_url` (one URL, a list, or a comma-separated string)
    cannot work, or None. Checked at load: a URL without a scheme ('localhost:8000') reads
    as scheme 'localhost', and the run then failed on a connect to a nonsense path."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(u, str) for u in items):
        return "must be an http(s) URL or a list of them"
    for url in (u.strip() for u in items):
        if not url:
            continue
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # a malformed port or IPv6 literal
            ok = False
        if not ok:
            return f"must be an http(s) URL (like http://host:8000), got {url!r}"
    return None


def _validate_engines(p: PipelineSpec) -> None:
    for name, engine in p.engines.items():
        if engine.kind != "openai":
            continue
        url = engine.options().get("base_url")
        if url in (None, "", []):  # ALTO_OPENAI_BASE_URL may give it where it runs
            continue
        why = _bad_base_url(url)
        if why:
            raise SpecError(why, field=f"engines.{name}.base_url")


def _validate_graph(p: PipelineSpec) -> None:
    _validate_engines(p)
    by: dict[str, StageSpec] = {}
    for s in p.stages:
        if s.name in by:
            raise SpecError("duplicate stage name", stage=s.name, field="name")
        by[s.name] = s
    if not p.stages:
        raise SpecError("a pipeline needs at least one stage", field="stages")
    for s in p.stages:
        for i, t in enumerate(s.to):
            if t not in by:
                raise SpecError(f"unknown stage {t!r}", stage=s.name, field=f"to[{i}]")
            if t == s.name:
                raise SpecError("a stage cannot send to itself", stage=s.name, field=f"to[{i}]")
        if len(set(s.to)) != len(s.to):
            raise SpecError("duplicate target", stage=s.name, field="to")
        if s.kind == "lm":
            if s.function:
                raise SpecError("function is for tool and reduce stages; an lm stage renders "
                                "its prompt for its engine", stage=s.name, field="function")
            if not s.prompt:
                raise SpecError("an lm stage needs a prompt template", stage=s.name, field="prompt")
            for written, name in ambiguous(s.prompt):
                if name in BUILTIN_VARS or name in by:
                    raise SpecError(
                        f"{written} is ambiguous: write {{{name}}} for its value, "
                        f"{{{{{name}}}}} to show the model {{{name}}} itself, and a blank "
                        f"between braces meant as text ({{ {{{name}}} }})",
                        stage=s.name, field="prompt",
                    )
            if (s.engine or "default") not in p.engines:
                raise SpecError(
                    f"unknown engine {s.engine or 'default'!r}", stage=s.name, field="engine"
                )
            if s.framing == "items":
                raise SpecError(
                    "framing 'items' is for tool/reduce stages", stage=s.name, field="framing"
                )
            if s.params:
                raise SpecError(
                    "params are passed to tool/reduce functions (ctx.params); an lm stage's "
                    "generation is set by max_tokens, temperature, stop and its engine's "
                    "options", stage=s.name, field="params",
                )
        else:
            for name in _LM_ONLY:
                # compared with the default, not "was it set": a spec dumped and validated
                # again (with_streaming) has every field set
                if getattr(s, name) != StageSpec.model_fields[name].default:
                    raise SpecError(
                        f"{name} is for lm stages; a {s.kind} stage calls its function, which "
                        "reads its settings from params (ctx.params)", stage=s.name, field=name,
                    )
            if not s.function:
                raise SpecError(
                    f"a {s.kind} stage needs a function (module:name)",
                    stage=s.name,
                    field="function",
                )
            if ":" not in s.function:
                raise SpecError(
                    "function must look like 'package.module:name'", stage=s.name, field="function"
                )
        if s.kind == "reduce" and not s.aggregates:
            raise SpecError("a reduce stage needs aggregate_by", stage=s.name, field="aggregate_by")
    entry = p.entry or p.stages[0].name
    if entry not in by:
        raise SpecError(f"unknown entry stage {entry!r}", field="entry")
    order = _topo(p)
    if len(order) != len(by):
        cyclic = sorted(set(by) - set(order))
        raise SpecError(
            f"the stage graph has a cycle through {cyclic}", stage=cyclic[0], field="to"
        )
    reach = _reachable(by, [entry], None)
    for s in p.stages:
        if s.name not in reach:
            raise SpecError(
                f"not reachable from the entry stage {entry!r}", stage=s.name, field="name"
            )
    sinks = [s.name for s in p.stages if not s.to]
    if p.output is not None and p.output not in sinks:
        raise SpecError(f"output {p.output!r} must be a stage with no 'to'", field="output")
    if p.output is None and len(sinks) > 1:
        raise SpecError(f"several final stages {sinks}: name one with 'output:'", field="output")
    if by[entry].aggregates:
        raise SpecError("the entry stage cannot aggregate", stage=entry, field="aggregate_by")
    for s in p.stages:
        if not s.aggregates:
            continue
        agg = s.aggregate_by or []
        if not agg or agg[0] != REQUEST:
            raise SpecError("must start with 'request'", stage=s.name, field="aggregate_by")
        scope = s.scope
        if len(set(scope)) != len(scope):
            raise SpecError("repeated stage", stage=s.name, field="aggregate_by")
        for x in scope:
            if x not in by:
                raise SpecError(f"unknown stage {x!r}", stage=s.name, field="aggregate_by")
            # x must be on every path from the entry to s (so each input has x in its lineage)
            if x != entry and s.name in _reachable(by, [entry], x):
                raise SpecError(
                    f"{x!r} is not on every path into this stage",
                    stage=s.name,
                    field="aggregate_by",
                )
            if x == s.name or s.name not in _reachable(by, by[x].to, None):
                raise SpecError(
                    f"{x!r} is not upstream of this stage", stage=s.name, field="aggregate_by"
                )
        between = _reachable(by, by[scope[-1]].to, None) if scope else set()
        for y in sorted(between):
            ys = by[y]
            if (
                y != s.name
                and ys.aggregates
                and s.name in _reachable(by, ys.to, None)
                and scope[-1] not in ys.scope
            ):
                raise SpecError(
                    f"stage {y!r} between {scope[-1]!r} and here aggregates by {ys.aggregate_by}, "
                    f"which drops the {scope[-1]!r} unit this stage is keyed by",
                    stage=s.name,
                    field="aggregate_by",
                )
        if scope:
            pos = [order.index(x) for x in scope]
            if pos != sorted(pos):
                raise SpecError("list scopes outer to inner", stage=s.name, field="aggregate_by")
        # every unit of the scope stage must reach s: no path from the scope to a sink avoids s
        start = by[scope[-1]].to if scope else [entry]
        escaped = [n for n in _reachable(by, start, s.name) if not by[n].to]
        if escaped:
            raise SpecError(
                f"output of {scope[-1] if scope else 'the request'} can reach final stage "
                f"{escaped[0]!r} without passing this stage, so it could never complete",
                stage=s.name,
                field="aggregate_by",
            )


def _locate(errors: list[dict[str, Any]], raw: dict[str, Any]) -> str:
    """Turn pydantic's error location into 'stages.<name>.<field>: message'."""
    parts = []
    for e in errors:
        loc = list(e.get("loc", ()))
        where: list[str] = []
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
            try:
                name = raw["stages"][loc[1]].get("name", f"#{loc[1]}")
            except (KeyError, IndexError, TypeError, AttributeError):
                name = f"#{loc[1]}"
            where = ["stages", str(name), *map(str, loc[2:])]
        else:
            where = [str(x) for x in loc]
        msg = e.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{'.'.join(where)}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_pipeline(raw: Any) -> PipelineSpec:
    """Validate a mapping (already parsed YAML) into a spec; raise SpecError on any mistake."""
    if not isinstance(raw, dict):
        raise SpecError("a pipeline spec must be a mapping")
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        errs = exc.errors()
        ctx_err = next(
            (
                e.get("ctx", {}).get("error")
                for e in errs
                if isinstance(e.get("ctx", {}).get("error"), SpecError)
            ),
            None,
        )
        if isinstance(ctx_err, SpecError):
            raise ctx_err from None
        raise SpecError(_locate(errs, raw)) from None


def load_pipeline(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:  # a syntax error's position names the file
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_pipeline(raw)


def with_streaming(spec: PipelineSpec, streaming: bool) -> PipelineSpec:
    """The same pipeline with every stage streaming (or barrier): how benchmarks compare."""
    raw = spec.model_dump(exclude_unset=False)
    raw["streaming"] = streaming
    for s in raw["stages"]:
        s["streaming"] = None
    return PipelineSpec.model_validate(raw)
