"""The scheduling benchmark is reachable as `alto bench scheduling`, and its ideal bound
is an upper bound a policy cannot beat on the workloads it reports."""

from __future__ import annotations

from typer.testing import CliRunner

from bench.scheduling import WORKLOADS, EngineConfig, ideal_throughput, make_classes


def test_alto_bench_mounts_the_scheduling_benchmark() -> None:
    from app.cli import cli

    result = CliRunner().invoke(cli, ["bench", "scheduling", "--help"])
    assert result.exit_code == 0, result.output
    assert "--workloads" in result.output and "--policies" in result.output


def test_ideal_bound_falls_with_longer_outputs_and_smaller_batches() -> None:
    w = WORKLOADS[0]
    classes = make_classes(w)
    base = ideal_throughput(w, classes, EngineConfig())
    for c in classes:
        c.out_mean *= 2  # twice the decode work per request
    longer = ideal_throughput(w, classes, EngineConfig())
    assert longer < base
    assert ideal_throughput(w, make_classes(w), EngineConfig(capacity=8)) < base
