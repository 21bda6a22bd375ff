"""Warnings about a valid pipeline spec that probably does not do what its author meant.

A spec that fails validation names the stage and field at load (orchestrator/spec.py).
Some mistakes are valid YAML and a valid graph, and only show up in a run's output. The
commonest is a prompt placeholder that names nothing: templates leave unknown `{names}`
as written, so that prompts can show JSON, and a typo (`{claim}` for the stage `claims`)
then reaches the model as literal text. `alto check` prints these; `--strict` makes them
errors for a pipeline repository's CI.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.spec import PipelineSpec, StageSpec
from orchestrator.template import variables


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
    are rendered: `system` is sent as written), and LM stages left on the simulator
    because no engine kind was written (a pipeline without `engines:` answers with
    pseudo-text, which looks like a model that has gone wrong)."""
    before, into = ancestors(spec), carried(spec)
    warnings: list[SpecWarning] = []
    for stage in spec.stages:
        if not stage.prompt:
            continue
        engine = stage.engine or "default"
        if "kind" not in spec.engines[engine].model_fields_set:
            warnings.append(SpecWarning(stage.name, "engine", (
                f"runs on the simulated engine: engine {engine!r} names no kind (give "
                "`engines:` an entry with kind: openai, local, vllm or sim), unless "
                "--engine or ALTO_ENGINE sets one at run time")))
        known = _known(stage, into)
        for name in dict.fromkeys(variables(stage.prompt)):
            if name not in known:
                why = _why(spec, stage, name, before[stage.name])
                warnings.append(SpecWarning(stage.name, "prompt",
                                            f"{{{name}}} is left as written ({why})"))
    return warnings
