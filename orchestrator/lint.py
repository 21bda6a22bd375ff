"""Warnings about a valid pipeline spec that probably does not do what its author meant.

A spec that fails validation names the stage and field at load (orchestrator/spec.py).
Some mistakes are valid YAML and a valid graph, and only show up in a run's output. The
commonest is a prompt placeholder that names nothing: templates leave unknown `{names}`
as written, so that prompts can show JSON, and a typo (`{claim}` for the stage `claims`)
then reaches the model as literal text. `alto check` prints these; `--strict` makes them
errors for a pipeline repository's CI.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import PipelineSpec, StageSpec
from orchestrator.template import BUILTIN_VARS, spaced_names, variables


@dataclass(frozen=True, slots=True)
class SpecWarning:
    stage: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"stages.{self.stage}.{self.field}: {self.message}"


def ancestors(spec: PipelineSpec) -> dict[str, set[str]]:
    """Every stage that can reach each stage (its transitive predecessors)."""
    found: dict[str, set[str]] = {}
    for name in spec.topo_order:
        seen: set[str] = set()
        for p in spec.predecessors[name]:
            seen |= {p} | found[p]
        found[name] = seen
    return found


def carried(spec: PipelineSpec) -> dict[str, set[str]]:
    """The upstream stages whose text reaches each stage's calls (its `values`). A unit
    carries the text of every stage on its lineage; an aggregating stage's call keeps only
    the run's input and the stages up to its innermost `aggregate_by` stage (what its
    group shares), and so does everything after it; a stage reached by several paths can
    count only on what every path carries."""
    into: dict[str, set[str]] = {}
    for name in spec.topo_order:
        stage = spec.stage(name)
        if stage.aggregates:
            inner = stage.scope[-1] if stage.scope else None
            into[name] = into[inner] | {inner} if inner else set()
        else:
            paths = [into[p] | {p} for p in spec.predecessors[name]]
            into[name] = set.intersection(*paths) if paths else set()
    return into


def _known(stage: StageSpec, into: dict[str, set[str]]) -> set[str]:
    """The placeholders a stage's prompt can fill: `input`, the carried stages, and
    `text` (one input) or `items` (an aggregating stage's group)."""
    return {"input", "items" if stage.aggregates else "text"} | into[stage.name]


def _why(spec: PipelineSpec, stage: StageSpec, name: str, before: set[str]) -> str:
    if name == "items":
        return "only an aggregating stage (aggregate_by) has items"
    if name == "text" and stage.aggregates:
        return "an aggregating stage has {items}, not {text}"
    if name in before:
        return (f"stage {name!r} is upstream, but its text does not reach this stage: an "
                "aggregating stage keeps only the input and the stages up to its innermost "
                "aggregate_by stage, for itself and what follows it, and a stage reached "
                "by several paths gets only what every path carries")
    if name in spec.by_name:
        return f"stage {name!r} is not upstream of this stage"
    return "neither a built-in (input, text, items) nor a stage of the pipeline"


def lint(spec: PipelineSpec) -> list[SpecWarning]:
    """Placeholders of each LM stage's prompt that the runtime cannot fill (only prompts
    are rendered: `system` is sent as written), LM stages left on the simulator
    because no engine kind was written (a pipeline without `engines:` answers with
    pseudo-text, which looks like a model that has gone wrong), and settings written
    where they do nothing."""
    before, into = ancestors(spec), carried(spec)
    warnings: list[SpecWarning] = []
    for stage in spec.stages:
        warnings += _inert(stage)
        if not stage.prompt:
            continue
        engine = stage.engine or "default"
        if "kind" not in spec.engines[engine].model_fields_set:
            warnings.append(SpecWarning(stage.name, "engine", (
                f"runs on the simulated engine: engine {engine!r} names no kind (give "
                "`engines:` an entry with kind: openai, local, vllm or sim), unless "
                "--engine or ALTO_ENGINE sets one at run time")))
        warnings += _idle_responder(spec, stage)
        known = _known(stage, into)
        for name in dict.fromkeys(variables(stage.prompt)):
            if name not in known:
                why = _why(spec, stage, name, before[stage.name])
                warnings.append(SpecWarning(stage.name, "prompt",
                                            f"{{{name}}} is left as written ({why})"))
        warnings += _spaced(spec, stage)
    return warnings


def _inert(stage: StageSpec) -> list[SpecWarning]:
    """Settings written on a stage that nothing reads there: valid, so the spec loads, but
    the author meant something by them (`partitions` to spread a hot stage, a backoff to
    retry failed calls) that will not happen."""
    written = stage.model_fields_set
    warnings: list[SpecWarning] = []
    if "partitions" in written and not stage.aggregates:
        warnings.append(SpecWarning(stage.name, "partitions", (
            "has no effect: only an aggregating stage (aggregate_by) is partitioned, by its "
            "groups; a stage without aggregate_by reads one stream that all its instances "
            "share")))
    if "retry_backoff_s" in written and stage.retries == 0:
        warnings.append(SpecWarning(stage.name, "retry_backoff_s", (
            "has no effect: the stage has no retries (retries: 0), so a failed call is "
            "never tried again; set retries to use the backoff")))
    return warnings


def _idle_responder(spec: PipelineSpec, stage: StageSpec) -> list[SpecWarning]:
    """A `responder` on a stage whose engine is not `sim`: only the sim engine calls one,
    so the author's canned answers never reach the run. Judged on the spec as written: an
    `--engine sim` (or ALTO_ENGINE=sim) at run time would use it, which the message says."""
    if not stage.responder:
        return []
    engine = stage.engine or "default"
    kind = spec.engines[engine].kind
    if kind == "sim":
        return []
    return [SpecWarning(stage.name, "responder", (
        f"has no effect: only a sim engine calls a responder, and engine {engine!r} is "
        f"kind {kind}; it is used only where --engine sim (or ALTO_ENGINE=sim) overrides "
        "the pipeline's engines"))]


def _spaced(spec: PipelineSpec, stage: StageSpec) -> list[SpecWarning]:
    """`{ input }`, which the renderer leaves as written (a placeholder has no blanks in
    its braces), but only for names a placeholder could mean (a built-in or a stage):
    `{ x }` in a code sample is as likely to be meant literally."""
    assert stage.prompt is not None
    meant = BUILTIN_VARS | set(spec.by_name)
    return [SpecWarning(stage.name, "prompt",
                        f"{written} is left as written (a placeholder has no blanks inside "
                        f"its braces: write {{{name}}} to fill it in)")
            for written, name in dict.fromkeys(spaced_names(stage.prompt)) if name in meant]


# How the runtime calls what a stage names (workers/stagefn.py, workers/engines/sim.py):
# a tool or reduce function as fn(value, ctx) (an aggregating stage's: fn(items, ctx)),
# awaiting a coroutine or iterating an async generator it returns; a `sim` engine calls a
# stage's responder as responder(prompt, params) and wants a str back.
FUNCTION_ARGS = ("value", "ctx")
RESPONDER_ARGS = ("prompt", "params")


def call_errors(stage: StageSpec, function: Callable[..., Any] | None = None,
                responder: Callable[..., Any] | None = None) -> list[str]:
    """What makes every call of a stage's (imported) function or responder fail, found
    without calling it: a signature that cannot take the runtime's two arguments, or a
    kind of function whose result the runtime cannot use. Errors, not warnings: no input
    would get through. One line each, named like spec errors (`stages.up.function: ...`)."""
    problems: list[str] = []
    if function is not None:
        assert stage.function is not None
        why = _arity(function, FUNCTION_ARGS) or _sync_generator(function)
        if why:
            problems.append(f"stages.{stage.name}.function: {stage.function!r} {why}")
    if responder is not None:
        assert stage.responder is not None
        why = _arity(responder, RESPONDER_ARGS) or _not_str(responder)
        if why:
            problems.append(f"stages.{stage.name}.responder: {stage.responder!r} {why}")
    return problems


def _arity(fn: Callable[..., Any], args: tuple[str, ...]) -> str | None:
    """Why `fn` cannot be called with `args` positionally, as the runtime calls it; None
    when it can or when its signature cannot be read (some builtins): not a guess."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args)
    except TypeError as exc:
        return (f"cannot be called with ({', '.join(args)}), as the runtime calls it: "
                f"its signature is {_bare(signature)} ({exc})")
    return None


def _bare(signature: inspect.Signature) -> inspect.Signature:
    """`signature` without annotations: the parameters are what is wrong, and postponed
    annotations would print as quoted strings."""
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty)


def _flagged(fn: Callable[..., Any], test: Callable[[Any], bool]) -> bool:
    """`test` on a function, or on the `__call__` of a callable object."""
    return test(fn) or (not inspect.isroutine(fn) and not inspect.isclass(fn)
                        and test(type(fn).__call__))


def _sync_generator(fn: Callable[..., Any]) -> str | None:
    if not _flagged(fn, inspect.isgeneratorfunction):
        return None
    return ("is a generator function (a plain `def` with `yield`), which the runtime does not "
            "iterate: the generator object itself would be the stage's output, and every "
            "run would fail (it is not JSON); write `async def` with `yield` to stream "
            "units as they come, or return a list")


def _not_str(fn: Callable[..., Any]) -> str | None:
    for test, what in ((inspect.isgeneratorfunction, "a generator function"),
                       (inspect.isasyncgenfunction, "an async generator function"),
                       (inspect.iscoroutinefunction, "an async function")):
        if _flagged(fn, test):
            return (f"is {what}: a sim engine calls a responder as responder(prompt, "
                    "params) and needs the str it returns, so every call would fail")
    return None
