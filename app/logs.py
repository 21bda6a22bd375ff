"""Logging setup of the `alto` process: plain text for people, JSON lines for collectors.

`ALTO_LOG_FORMAT=json` makes every record one JSON object on stderr (what Loki, Cloud
Logging, Elasticsearch and friends parse without configuration), carrying `run`, `stage`
and `pipeline` when known, so one run can be followed across the gateway and every
worker by filtering on its id. They come from three places, most specific first:
`extra={"run": ...}` on the call, `log_context(...)` around a block (a contextvar, so it
follows asyncio tasks created inside it), and process defaults (`set_defaults`, which
`alto worker` uses: a worker serves one stage for its whole life).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

FIELDS = ("run", "stage", "pipeline")
_context: ContextVar[dict[str, str]] = ContextVar("alto_log_context", default={})  # noqa: B039
_defaults: dict[str, str] = {}

# attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def set_defaults(**fields: str | None) -> None:
    """Fields for every record of this process (a worker's pipeline and stage)."""
    _defaults.update({k: str(v) for k, v in fields.items() if v is not None})


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Fields for every record logged inside the block (and tasks it starts)."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts run/stage/pipeline on each record (if the call did not) for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        for name in FIELDS:
            if getattr(record, name, None) is None:
                value = ctx.get(name) or _defaults.get(name)
                if value is not None:
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The CLI's old one-line format, with [run stage] appended when known."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [str(getattr(record, k)) for k in ("stage", "run") if getattr(record, k, None)]
        return f"{text} [{' '.join(tags)}]" if tags else text


def _level(name: str, source: str) -> int:
    levels = logging.getLevelNamesMapping()
    level = levels.get(name.strip().upper())
    if level is None:
        names = ", ".join(n.lower() for n in levels if n not in ("NOTSET", "WARN", "FATAL"))
        raise ValueError(f"{source} must be one of {names}, not {name!r}")
    return level


def _handler(fmt: str, level: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    # the level is the handler's too: a library that sets its own logger's level (bm25s
    # sets DEBUG) must not get records below ours printed
    handler.setLevel(level)
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(levelname)s %(name)s: %(message)s")
    )
    return handler


def configure(fmt: str | None = None, level: str | None = None) -> None:
    """Install one stderr handler on the root logger (replacing any), from the arguments
    or ALTO_LOG_FORMAT (text|json, default text) and ALTO_LOG_LEVEL (default warning).

    Records below that level are not printed, whatever level a library gives its own
    logger. The default differs from `Settings.log_level`'s (info, workers/settings.py):
    that one is the level `alto serve` gives uvicorn's loggers (which log through handlers
    of their own, `own_handler` for JSON), so with ALTO_LOG_LEVEL unset the gateway shows
    uvicorn's startup and access lines and alto's own warnings. Raises ValueError (naming
    the variable) for a format or level it does not know."""
    fmt = (fmt or os.environ.get("ALTO_LOG_FORMAT") or "text").strip().lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"ALTO_LOG_FORMAT must be text or json, not {fmt!r}")
    level_no = _level(level or os.environ.get("ALTO_LOG_LEVEL") or "warning", "ALTO_LOG_LEVEL")
    handler = _handler(fmt, level_no)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level_no)


def own_handler(name: str, level: str) -> None:
    """Give logger `name` (and its children) a handler like the root's but at `level`,
    and stop its records at it: `alto serve` gives uvicorn its own level this way when
    logging JSON, as uvicorn's own text handlers have in text mode."""
    fmt = "json" if is_json() else "text"
    level_no = _level(level, f"the log level of {name!r}")
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(_handler(fmt, level_no))
    logger.setLevel(level_no)
    logger.propagate = False


def is_json() -> bool:
    """Whether the root logger writes JSON (then uvicorn must not install its own handlers)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
