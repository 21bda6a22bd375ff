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


def _known(stage: StageSpec, before: dict[str, set[str]]) -> set[str]:
    """The placeholders a stage's prompt can fill. A unit carries the text of every stage on
    its lineage; an aggregating stage's call keeps only those up to its innermost scope
    stage (what its group shares) and the run's input, and has `items` instead of `text`."""
    if not stage.aggregates:
        return {"input", "text"} | before[stage.name]
    scope = stage.scope
    if not scope:
        return {"input", "items"}
    return {"input", "items", scope[-1]} | before[scope[-1]]


def _why(spec: PipelineSpec, stage: StageSpec, name: str) -> str:
    if name == "items":
        return "only an aggregating stage (aggregate_by) has items"
    if name == "text" and stage.aggregates:
        return "an aggregating stage has {items}, not {text}"
    if name in spec.by_name and stage.aggregates:
        return (f"stage {name!r} is not shared by this stage's groups: a call keeps the "
                "input and the stages up to its innermost aggregate_by stage")
    if name in spec.by_name:
        return f"stage {name!r} is not upstream of this stage"
    return "neither a built-in (input, text, items) nor a stage of the pipeline"


def lint(spec: PipelineSpec) -> list[SpecWarning]:
    """Placeholders of each LM stage's prompt that the runtime cannot fill. Only prompts
    are rendered (`system` is sent as written)."""
    before = ancestors(spec)
    warnings: list[SpecWarning] = []
    for stage in spec.stages:
        if not stage.prompt:
            continue
        known = _known(stage, before)
        for name in dict.fromkeys(variables(stage.prompt)):
            if name not in known:
                warnings.append(SpecWarning(
                    stage.name, "prompt",
                    f"{{{name}}} is left as written ({_why(spec, stage, name)})"))
    return warnings
