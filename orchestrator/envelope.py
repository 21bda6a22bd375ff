"""The message envelope that travels between stages, and its wire form.

Ids are deterministic functions of (run, lineage, target, kind): a stage that runs
again after a crash republishes the *same* ids, which is what lets every consumer
recognise a redelivered or republished message and count it once.

The wire form is compact UTF-8 JSON. It is written and read on every hop, so it goes
through orjson, falling back to the standard library wherever the two would not agree
(see `dumps_json`): the bytes may differ in spelling (e.g. `1e-5` for `1e-05`) but
every value reads back as the standard library would have written it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import orjson

# Types orjson would encode where the standard library raises or differs are handed to
# `default`, which is absent, so they raise and take the standard-library path.
_ORJSON_OPTS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _as_orjson(value: Any) -> Any:
    """What orjson writes for the types it encodes natively and the standard library
    refuses (a UUID as its canonical text, an Enum as its value): without it a tool's
    UUID or Enum encoded or failed depending on whether a `null` elsewhere in the same
    envelope sent it down the standard-library path."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps_json(value: Any) -> bytes:
    """`json.dumps(value, separators=(",", ":"), ensure_ascii=False)` as UTF-8, fast.

    orjson writes NaN and infinities as `null`, where the standard library keeps them
    (as `NaN`, `Infinity`); so any output containing `null` is rewritten by the standard
    library (a cheap substring test; end markers omit their null payload to stay fast).
    Integers beyond 64 bits, non-string keys and subclasses of built-in types also take
    that path, and whatever the standard library refuses raises its TypeError/ValueError,
    except UUIDs and Enums, which both paths write as orjson does (`_as_orjson`).
    Text with a lone UTF-16 surrogate (which no UTF-8 holds) is written with ASCII escapes,
    which read back as the same text.
    """
    try:
        out = orjson.dumps(value, option=_ORJSON_OPTS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        out = b"null"
    if b"null" in out:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          default=_as_orjson)
        try:
            return text.encode()
        except UnicodeEncodeError:  # a lone surrogate (orjson refuses it too): escaped
            return json.dumps(value, separators=(",", ":"), ensure_ascii=True,
                              default=_as_orjson).encode()
    return out


def strict_json(value: Any) -> bytes:
    """JSON for clients (the gateway's answers, `alto run --json`): `dumps_json`, except
    that a NaN or an infinity a stage returned is `null`, as pydantic's JSON mode and
    orjson write them. The wire between stages keeps them (they read back as Python
    floats); a client's parser (JavaScript's JSON.parse, most others) refuses a whole
    body for one bare `NaN`."""
    out = dumps_json(value)
    if b"NaN" in out or b"Infinity" in out:  # maybe only inside a string: then no change
        out = dumps_json(_finite(value))
    return out


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# orjson reads integers in [-2**63, 2**64 - 1] exactly and turns larger ones into floats.
# Every integer of up to 19 digits is below 2**64 (20 digits), so only a run of 20 digits,
# or of 19 after a minus sign, can be out of range: text holding one (in a number or not)
# takes the standard-library path; nanosecond timestamps (19 digits) stay on the fast one.
# The runs are found by mapping every byte to its class and searching for the run as a
# substring: a regular expression walks the text in Python's regex engine at ~20 ns a
# character, which on a 5 KB LLM answer cost ten times the parse itself.
_DIGIT_CLASSES = bytes(48 if 48 <= b <= 57 else 45 if b == 45 else 32 for b in range(256))
_LONG_RUN = b"0" * 20
_LONG_NEGATIVE_RUN = b"-" + b"0" * 19


def _may_hold_a_long_integer(text: str | bytes) -> bool:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    classes = data.translate(_DIGIT_CLASSES)
    return _LONG_RUN in classes or _LONG_NEGATIVE_RUN in classes


def loads_json(text: str | bytes) -> Any:
    """Read JSON as the standard library does: also what orjson refuses (NaN, Infinity)
    and integers beyond 64 bits, which orjson would turn into floats."""
    if not _may_hold_a_long_integer(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)

Lineage = tuple[tuple[str, int], ...]
MessageKind = Literal["unit", "end"]


def lineage_str(lineage: Lineage) -> str:
    return "/".join([f"{s}.{i}" for s, i in lineage]) or "-"


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


_CREDITS: dict[str, Fraction] = {}  # parsed credits: few distinct ones, Fraction is slow


def parse_credit(text: str) -> Fraction:
    c = _CREDITS.get(text)
    if c is None:
        num, _, den = text.partition("/")
        c = Fraction(int(num), int(den or 1))
        if len(_CREDITS) >= 4096:
            _CREDITS.clear()
        _CREDITS[text] = c
    return c


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

    def to_wire(self) -> bytes:
        """The wire form (UTF-8 JSON); a None payload is left out, which reads back as None."""
        d: dict[str, Any] = {
            "id": self.id,
            "run": self.run,
            "p": self.pipeline,
            "s": self.stage,
            "l": lineage_str(self.lineage),
            "k": self.kind,
            "c": credit_str(self.credit),
            "from": self.sender,
            "sc": {k: credit_str(v) for k, v in self.scope.items()},
            "ctx": self.context,
        }
        if self.payload is not None:
            d["x"] = self.payload
        return dumps_json(d)

    def to_json(self) -> str:
        return self.to_wire().decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        d = loads_json(text)
        sc = d.get("sc")
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
            scope={k: parse_credit(v) for k, v in sc.items()} if sc else {},
            context=d.get("ctx", {}),
        )


def unit_id(run: str, lineage: Lineage | str, target: str) -> str:
    """A unit is named by its lineage (unique: it ends with the emitting stage and index);
    `lineage` may be given as its `lineage_str` already, which a producer needs anyway."""
    text = lineage if isinstance(lineage, str) else lineage_str(lineage)
    return f"{run}:{text}>{target}"


def end_id(cause: str, target: str) -> str:
    """An end marker is named after what it closes (an input message id or an aggregation
    key), hashed so ids stay short however deep the pipeline is."""
    digest = hashlib.blake2b(cause.encode(), digest_size=12).hexdigest()
    return f"{cause.partition(':')[0]}:end.{digest}>{target}"
