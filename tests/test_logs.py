"""ALTO_LOG_FORMAT=json: one JSON object per record, with run id and stage wherever known."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from app import logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, defaults = list(root.handlers), root.level, dict(logs._defaults)
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        logs._defaults.clear()
        logs._defaults.update(defaults)


def records(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


async def test_json_records_carry_run_and_stage(
    restore_root: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALTO_LOG_FORMAT", "json")
    monkeypatch.setenv("ALTO_LOG_LEVEL", "info")
    logs.configure()
    assert logs.is_json()
    log = logging.getLogger("alto.test")
    logs.set_defaults(pipeline="factool", stage="verify")
    log.debug("below the level")
    log.info("process defaults")
    with logs.log_context(run="run-1"):
        # a task started inside the block keeps the run id (contextvars follow tasks)
        await asyncio.create_task(asyncio.to_thread(lambda: None))
        await asyncio.create_task(_log_later(log))
        log.warning("explicit wins", extra={"run": "run-2", "attempt": 3})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    out = records(capsys.readouterr().err)
    assert [r["message"] for r in out] == ["process defaults", "in a task", "explicit wins",
                                           "failed"]
    assert all(r["stage"] == "verify" and r["pipeline"] == "factool" for r in out)
    assert "run" not in out[0]
    assert out[1]["run"] == "run-1" and out[1]["level"] == "info"
    assert out[2]["run"] == "run-2" and out[2]["attempt"] == 3
    assert "run" not in out[3] and "RuntimeError: boom" in str(out[3]["exc"])
    assert all(str(r["ts"]).endswith("+00:00") for r in out)


async def _log_later(log: logging.Logger) -> None:
    log.info("in a task")


def test_text_format_and_bad_format(restore_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text", "warning")
    assert not logs.is_json()
    with logs.log_context(run="r9", stage="claims"):
        logging.getLogger("alto.x").warning("hello")
    assert capsys.readouterr().err.strip() == "WARNING alto.x: hello [claims r9]"
    with pytest.raises(ValueError, match="text or json"):
        logs.configure("yaml")
