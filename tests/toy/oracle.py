"""A sequential reference interpreter of pipeline semantics, for property tests.

It evaluates a pipeline the slow, obvious way — stage by stage in topological order,
each aggregating stage grouping *all* of its inputs by key — with none of the runtime's
machinery (no credit, no transport, no concurrency). The runtime must agree with it.
"""

from __future__ import annotations

from typing import Any

from orchestrator.envelope import Lineage
from orchestrator.routing import key_lineage
from orchestrator.spec import PipelineSpec
from orchestrator.template import StageContext
from workers.stagefn import resolve


def evaluate(spec: PipelineSpec, text: str, run: str = "oracle") -> list[Any]:
    inbox: dict[str, list[tuple[Lineage, Any, dict[str, Any]]]] = {s: [] for s in spec.by_name}
    inbox[spec.entry_stage].append(((), text, {"input": text}))
    outputs: list[tuple[Lineage, Any]] = []
    for name in spec.topo_order:
        stage = spec.stage(name)
        fn = resolve(stage.function or "", stage=name, field_name="function")
        calls: list[tuple[Lineage, Any, dict[str, Any]]] = []
        if stage.aggregates:
            groups: dict[Lineage, list[tuple[Lineage, Any, dict[str, Any]]]] = {}
            for lin, value, ctx in inbox[name]:
                klin = key_lineage(stage, lin)
                assert klin is not None
                groups.setdefault(klin, []).append((lin, value, ctx))
            # a key exists once its scope unit exists, even if nothing reached the stage
            for klin in _scope_units(spec, name, inbox, text):
                groups.setdefault(klin, [])
            for klin, members in groups.items():
                members.sort(key=lambda m: m[0])
                keep = {s for s, _ in klin} | {"input"}
                ctx = {
                    k: v
                    for k, v in (members[0][2] if members else {"input": text}).items()
                    if k in keep
                }
                sc = StageContext(run, spec.name, name, klin, ctx, params=stage.params)
                calls.append((klin, fn([m[1] for m in members], sc), ctx))
        else:
            for lin, value, ctx in inbox[name]:
                calls.append((lin, fn(value, StageContext(run, spec.name, name, lin, ctx,
                                                          params=stage.params)), ctx))
        for base, result, ctx in calls:
            units = result if isinstance(result, list) else [result]
            for j, unit in enumerate(units, start=1):
                lin = (*base, (name, j))
                if not stage.to:
                    outputs.append((lin, unit))
                for t in stage.to:
                    inbox[t].append((lin, unit, {**ctx, name: unit}))
    return [u for _, u in sorted(outputs, key=lambda o: o[0])]


def _scope_units(spec: PipelineSpec, name: str, inbox: dict[str, Any], text: str) -> list[Lineage]:
    """Every unit of the aggregation scope stage (empty groups still fire)."""
    stage = spec.stage(name)
    if not stage.scope:
        return [()]
    inner = stage.scope[-1]
    out = set()
    for t in spec.by_name[inner].to:
        for lin, _, _ in inbox[t]:
            for i, (s, _) in enumerate(lin):
                if s == inner:
                    out.add(lin[: i + 1])
    # units of `inner` reach all of its successors, so its direct successors' inboxes hold
    # every one of them (once the scope stage has run, which topo order guarantees)
    return sorted(out)
