"""Where messages go: stream names, aggregation keys, partitions, credit splitting.

Credit rule (DESIGN.md, "exact completion"): a stage that processes an input holding
credit c gives its j-th unit c/2^j and its end marker the rest, c/2^K, where K is the
number of units it published; every amount is split evenly over the stage's successors.
Nothing else creates or destroys credit, so an aggregator knows exactly when it has
everything: the credit it received for a key adds up to the credit of the key's root.
"""

from __future__ import annotations

import zlib
from fractions import Fraction

from orchestrator.envelope import Envelope, Lineage, lineage_str
from orchestrator.spec import PipelineSpec, StageSpec

PREFIX = "alto"


def unit_credit(credit: Fraction, index: int) -> Fraction:
    """Credit of the index-th (1-based) unit emitted for an input holding `credit`."""
    return credit / (1 << index)


def end_credit(credit: Fraction, units: int) -> Fraction:
    return credit / (1 << units)


def stage_group(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


def stage_streams(spec: PipelineSpec, stage: str) -> list[str]:
    """All streams a stage reads: one, or one per partition for an aggregating stage."""
    s = spec.stage(stage)
    base = f"{PREFIX}:{spec.name}:{stage}"
    if not s.aggregates:
        return [base]
    return [f"{base}:p{i}" for i in range(s.partitions)]


def key_lineage(stage: StageSpec, lineage: Lineage) -> Lineage | None:
    """The lineage prefix that identifies a message's aggregation group at `stage`, or None
    when the message belongs to an enclosing scope (an end marker of the scope stage)."""
    scope = stage.scope
    if not scope:
        return ()
    inner = scope[-1]
    for i, (name, _) in enumerate(lineage):
        if name == inner:
            return lineage[: i + 1]
    return None


def aggregation_key(run: str, klin: Lineage) -> str:
    return f"{run}|{lineage_str(klin)}"


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


def stream_for(spec: PipelineSpec, env: Envelope) -> str:
    """The stream an envelope addressed to `env.stage` is published on."""
    s = spec.stage(env.stage)
    base = f"{PREFIX}:{spec.name}:{env.stage}"
    if not s.aggregates:
        return base
    klin = key_lineage(s, env.lineage)
    # outer-scope markers have no key: any partition may forward them; keep them with the run
    key = aggregation_key(env.run, klin) if klin is not None else env.run
    return f"{base}:p{partition_of(key, s.partitions)}"


def expected_credit(stage: StageSpec, env: Envelope) -> Fraction:
    scope = stage.scope
    return env.scope[scope[-1]] if scope else Fraction(1)
