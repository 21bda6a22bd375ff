"""The message envelope that travels between stages, and its wire form.

Ids are deterministic functions of (run, lineage, target, kind): a stage that runs
again after a crash republishes the *same* ids, which is what lets every consumer
recognise a redelivered or republished message and count it once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

Lineage = tuple[tuple[str, int], ...]
MessageKind = Literal["unit", "end"]


def lineage_str(lineage: Lineage) -> str:
    return "/".join(f"{s}.{i}" for s, i in lineage) or "-"


def parse_lineage(text: str) -> Lineage:
    if text in ("", "-"):
        return ()
    out = []
    for part in text.split("/"):
        stage, _, idx = part.rpartition(".")
        out.append((stage, int(idx)))
    return tuple(out)


def credit_str(c: Fraction) -> str:
    return f"{c.numerator}/{c.denominator}"


def parse_credit(text: str) -> Fraction:
    num, _, den = text.partition("/")
    return Fraction(int(num), int(den or 1))


@dataclass(slots=True)
class Envelope:
    """One message addressed to one stage.

    kind="unit" carries a payload for the target to process; kind="end" is a
    credit-only marker that closes the output of one input of the sender.
    `scope` holds, for each ancestor stage on the lineage, the credit its unit had
    when emitted: an aggregator keyed by that stage expects exactly that much.
    `context` holds the text of each ancestor unit (and the run input) so prompt
    templates can refer to them by stage name.
    """

    run: str
    pipeline: str
    stage: str
    lineage: Lineage
    kind: MessageKind
    credit: Fraction
    payload: Any = None
    sender: str = ""
    scope: dict[str, Fraction] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            if self.kind != "unit":
                raise ValueError("an end marker needs an explicit id (see end_id)")
            self.id = unit_id(self.run, self.lineage, self.stage)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "run": self.run,
                "p": self.pipeline,
                "s": self.stage,
                "l": lineage_str(self.lineage),
                "k": self.kind,
                "c": credit_str(self.credit),
                "from": self.sender,
                "x": self.payload,
                "sc": {k: credit_str(v) for k, v in self.scope.items()},
                "ctx": self.context,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        d = json.loads(text)
        return cls(
            id=d["id"],
            run=d["run"],
            pipeline=d["p"],
            stage=d["s"],
            lineage=parse_lineage(d["l"]),
            kind=d["k"],
            credit=parse_credit(d["c"]),
            sender=d.get("from", ""),
            payload=d.get("x"),
            scope={k: parse_credit(v) for k, v in d.get("sc", {}).items()},
            context=d.get("ctx", {}),
        )


def unit_id(run: str, lineage: Lineage, target: str) -> str:
    """A unit is named by its lineage (unique: it ends with the emitting stage and index)."""
    return f"{run}:{lineage_str(lineage)}>{target}"


def end_id(cause: str, target: str) -> str:
    """An end marker is named after what it closes (an input message id or an aggregation
    key), hashed so ids stay short however deep the pipeline is."""
    digest = hashlib.blake2b(cause.encode(), digest_size=12).hexdigest()
    return f"{cause.partition(':')[0]}:end.{digest}>{target}"
