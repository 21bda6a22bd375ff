"""Command packing in C for redis-py's asyncio connections.

redis-py's asyncio `Connection.pack_command` builds the RESP bytes in Python, re-joining a
growing buffer for every argument; a worker's group commit is one script call with
hundreds of arguments, so packing was the largest single cost per input (a py-spy
profile of the overhead benchmark put it at ~20% of the worker's CPU). hiredis (which
redis-py already uses to parse replies when installed) packs in C. The sync client does
this by itself (`HiredisRespSerializer`); the asyncio client does not, hence this mixin.
Without hiredis the pool keeps redis-py's own classes.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import DataError

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency; stay correct without it
    hiredis = None


class _HiredisPacking:
    """Overrides `pack_command` with hiredis's (same splitting of a first argument that
    holds several words, as redis-py does)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def use_hiredis_packing(pool: Any) -> None:
    """Make `pool` create connections that pack in C (TCP, TLS and Unix-socket alike)."""
    if hiredis is None or issubclass(pool.connection_class, _HiredisPacking):
        return
    base = pool.connection_class
    pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
