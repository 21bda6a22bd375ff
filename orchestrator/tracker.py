"""Follows one run's event log and decides, exactly, when stages and the run are done.

Runners append raw events (`partial`, `credit`, `error`); the tracker de-duplicates them
by message id, adds up the credit each stage has processed and derives `stage_done`
(a stage has processed all the credit the graph sends through it) and `result` (every
final stage is done). Derived events get ids of the form `<raw id>.<n>`, so a client that
resumes after any id — raw or derived — replays the log through a fresh tracker and
skips what it already has: no event is lost or repeated across reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from orchestrator.envelope import parse_credit, parse_lineage
from orchestrator.spec import PipelineSpec


def event_order(event_id: str) -> tuple[int, int, int]:
    """Sort key for raw ids ("ms-seq") and derived ids ("ms-seq.n")."""
    base, _, sub = event_id.partition(".")
    ms, _, seq = base.partition("-")
    return int(ms), int(seq or 0), int(sub or 0)


@dataclass
class RunTracker:
    spec: PipelineSpec
    run: str
    seen: set[str] = field(default_factory=set)
    processed: dict[str, Fraction] = field(default_factory=dict)
    done_stages: set[str] = field(default_factory=set)
    outputs: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # mid -> (lineage key, data)
    finished: bool = False
    failed: str | None = None

    def feed(self, event_id: str, event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Take one raw event; return what a client should see: the event itself (unless a
        duplicate or internal) followed by any events it caused, each with its id."""
        if self.finished:
            return []
        kind = event.get("type")
        mid = event.get("mid")
        if mid is not None:
            if mid in self.seen:
                return []
            self.seen.add(mid)
        out: list[tuple[str, dict[str, Any]]] = []
        if kind == "credit":
            stage = event["stage"]
            total = self.processed.get(stage, Fraction(0)) + parse_credit(event["credit"])
            self.processed[stage] = total
            flow = self.spec.flow[stage]
            if total > flow:
                self.failed = f"credit overflow at stage {stage!r}: {total} > {flow}"
                self.finished = True
                err = {"type": "error", "run": self.run, "message": self.failed, "code": "internal"}
                return [(f"{event_id}.1", err)]
            if total == flow and stage not in self.done_stages:
                self.done_stages.add(stage)
                out.append(
                    (f"{event_id}.1", {"type": "stage_done", "run": self.run, "stage": stage})
                )
                if all(s in self.done_stages for s in self.spec.sinks):
                    self.finished = True
                    out.append((f"{event_id}.2", self.result_event()))
            return out
        if kind == "partial" and event.get("stage") == self.spec.output_stage:
            self.outputs[mid or event_id] = (
                parse_lineage(event.get("lineage", "")),
                event.get("data"),
            )
        if kind == "error":
            self.failed = event.get("message", "error")
            self.finished = True
        return [(event_id, event)]

    def result_units(self) -> list[Any]:
        return [data for _, data in sorted(self.outputs.values(), key=lambda t: t[0])]

    def result_event(self) -> dict[str, Any]:
        units = self.result_units()
        return {
            "type": "result",
            "run": self.run,
            "pipeline": self.spec.name,
            "stage": self.spec.output_stage,
            "output": units[0] if len(units) == 1 else units,
            "units": units,
        }
