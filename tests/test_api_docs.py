"""docs/API.md against the code. The metrics table: every series the gateway
(app/metrics.py) and a worker (workers/metrics.py) export is documented, with its labels
and the process that serves it, and nothing documented is gone. Operators build
dashboards and alerts from that table; a metric added in code only (as
alto_stage_call_errors_total, alto_worker_info and the scheduling gauges once were) is
invisible to them. The errors table: the answers no other test covers (405, 500
`internal`) are what its rows say."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from app.main import create_app
from app.metrics import Metrics
from workers.metrics import WorkerMetrics
from workers.settings import Settings

API_MD = Path(__file__).resolve().parents[1] / "docs" / "API.md"
SERVERS = {"gateway": lambda: Metrics().registry, "worker": lambda: WorkerMetrics().registry}
Exported = dict[str, tuple[str, ...]]  # name as scraped -> label names


def exported(registry: CollectorRegistry) -> Exported:
    """The metric families of `registry` by the name a scrape shows (a counter's with
    `_total`, a histogram's base name), with their label names. Families come from the
    public `collect()`; the label names of a labelled metric with no series yet exist only
    on its collector (prometheus_client's `_labelnames`)."""
    labels: dict[str, tuple[str, ...]] = {}
    for collector in list(registry._collector_to_names):  # noqa: SLF001 - see above
        for family in collector.describe() if hasattr(collector, "describe") else ():
            labels[family.name] = tuple(getattr(collector, "_labelnames", ()))
    out: Exported = {}
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        out[name] = labels.get(family.name, ())
    return out


def documented() -> list[dict[str, Any]]:
    """The rows of the table under `## Health and metrics`: names, labels, servers."""
    text = API_MD.read_text()
    section = text[text.index("## Health and metrics"):]
    section = section[:m.start()] if (m := re.search(r"^## ", section[3:], re.M)) else section
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 4:
            continue
        rows.append({"names": re.findall(r"`([a-z_*]+)`", cells[0]),
                     "labels": {x.strip() for x in cells[1].split(",") if x.strip()},
                     "servers": {x.strip() for x in cells[2].split(",")},
                     "line": line})
    assert rows, "docs/API.md has no metrics table under '## Health and metrics'"
    return rows


def doc_for(name: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row documenting `name` (`process_*` covers the process collector's series)."""
    for row in rows:
        if name in row["names"] or any(n.endswith("*") and name.startswith(n[:-1])
                                       for n in row["names"]):
            return row
    return None


@pytest.mark.parametrize("server", list(SERVERS))
def test_every_exported_metric_is_documented_with_its_labels(server: str) -> None:
    rows = documented()
    missing, wrong = [], []
    for name, labels in sorted(exported(SERVERS[server]()).items()):
        row = doc_for(name, rows)
        if row is None or server not in row["servers"]:
            missing.append(name)
        elif not name.startswith("process_") and set(labels) != row["labels"]:
            wrong.append(f"{name}: code {sorted(labels)}, docs {sorted(row['labels'])}")
    assert missing == [], f"metrics of the {server} missing from docs/API.md: {missing}"
    assert wrong == [], f"labels differ: {wrong}"


def test_every_documented_metric_is_exported_where_the_docs_say() -> None:
    """No stale rows: a renamed or removed metric must leave the table too."""
    by_server = {server: exported(make()) for server, make in SERVERS.items()}
    stale = []
    for row in documented():
        for name in row["names"]:
            for server in row["servers"]:
                names = by_server.get(server, {})
                found = (any(n.startswith(name[:-1]) for n in names) if name.endswith("*")
                         else name in names)
                if not found:
                    stale.append(f"{name} ({server})")
    assert stale == [], f"documented in docs/API.md but not exported: {stale}"


# ---- the errors table ---------------------------------------------------------------------


def error_rows(status: int) -> list[str]:
    text = API_MD.read_text()
    table = text[text.index("## Errors"):text.index("## Health and metrics")]
    return [line for line in table.splitlines() if line.startswith(f"| {status} |")]


def test_the_405_and_500_answers_are_the_documented_ones() -> None:
    """A method a route does not take, and an unexpected exception in a handler."""
    app = create_app(Settings.model_construct(), pipelines=[])

    @app.get("/boom", include_in_schema=False)
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        wrong_method = client.get("/v1/chat/completions")
        bug = client.get("/boom")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert bug.status_code == 500 and "a bug" not in bug.text
    for answer in (wrong_method, bug):
        error = answer.json()["error"]
        rows = error_rows(answer.status_code)
        assert any(f"`{error['type']}` / " in row and f"`{error['code']}`" in row
                   for row in rows), (error, rows)
