"""The Redis Streams transport: the distributed implementation of `Transport`.

Key layout (all under a configurable prefix, default "alto:"):
  {p}stream:{name}              work stream; entries carry one field "e" = Envelope JSON
  {p}run:{run}:events           run event log (stream; the entry id IS the event id)
  {p}run:{run}:progress         hash  key -> "3" or "3:done"
  {p}run:{run}:cancel           string, set by cancel() with a TTL
  {p}lease:{name}               hash {owner, token}, PX ttl
  {p}fence:{name}               fencing-token counter of lease {name}
  {p}members:{group}            zset member -> expiry (ms, Redis server clock)
  {p}memberinfo:{group}         hash member -> info JSON
  {p}h:{key}                    hash of floats (hincr/hgetall)

Why several operations are Lua scripts: they must be atomic *and* exact. A claim has to
read the delivery count of exactly what it claimed (XAUTOCLAIM does not return it);
trim has to compute the safe MINID and trim before anyone can create a group or ack;
a multi-stream read must never take more than `count` entries (XREADGROUP's COUNT is
per stream); leases compare-and-renew; membership uses the server clock so instances
with skewed clocks agree on who is alive.

Connection errors are retried with exponential backoff (about 3 s in all: long enough to
ride over a Redis restart), then surface to the caller, which re-runs its step later.
A retried commit whose reply was lost may apply twice: that is safe because every
write is idempotent under the runtime's de-duplication (deterministic message ids,
event `mid`s, progress records that are set, never incremented; XACK and lease
renewal are idempotent).

Leases are hashes {owner, token}; {p}fence:{name} is the lease's token counter (INCR on
every new acquisition, never expires). Commits go out as one Lua script per batch (the
group commit, `_COMMIT`): it checks each fenced commit's token and applies each commit's
writes in order. One script call instead of a MULTI/EXEC of ~10 commands per input is
what keeps a worker's Redis client work (command packing, reply parsing) per batch rather
than per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.embedded import NoGroupError
from orchestrator.envelope import Envelope, dumps_json, loads_json
from orchestrator.transport import (
    Commit,
    Delivery,
    FencedError,
    PendingEntry,
    Progress,
    StreamStats,
    Transport,
)
from workers.redis_wire import use_hiredis_packing

__all__ = ["RedisTransport"]


def _id_order(entry_id: str) -> tuple[int, int]:
    """Stream ids sort as (milliseconds, sequence), not as strings."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

# Non-blocking read of up to ARGV[3] new entries across KEYS, in KEYS order. When nothing
# is new, also returns each stream's last entry id: an XREAD BLOCK from there wakes on the
# next entry without taking it (so it can never overshoot `count`), and cannot miss one
# added between this script and that XREAD.
_CONSUME = """
local left = tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  if left <= 0 then break end
  local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                         'STREAMS', key, '>')
  if res then
    for _, entry in ipairs(res[1][2]) do
      local fields, e = entry[2], false
      for j = 1, #fields, 2 do if fields[j] == 'e' then e = fields[j + 1] end end
      out[#out + 1] = i
      out[#out + 1] = entry[1]
      out[#out + 1] = e
      left = left - 1
    end
  end
end
local tails = {}
if #out == 0 then
  for i, key in ipairs(KEYS) do
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if last[1] then tails[i] = last[1][1] else tails[i] = '0-0' end
  end
end
return {out, tails}
"""

# Appends a claimed entry to `out` as {id, envelope, delivery count}, the count read in the
# same atomic step (XCLAIM and XAUTOCLAIM do not report it). Entries trimmed away (a nil or
# empty field list) are skipped; returns whether it appended.
_PUSH_CLAIMED = """
local function push_claimed(out, entry)
  if type(entry) ~= 'table' or type(entry[2]) ~= 'table' then return false end
  local fields, e = entry[2], false
  for j = 1, #fields, 2 do if fields[j] == 'e' then e = fields[j + 1] end end
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
  out[#out + 1] = entry[1]
  out[#out + 1] = e
  out[#out + 1] = p[1][4]
  return true
end
"""

# XAUTOCLAIM until `count` entries or the end of the PEL.
_CLAIM = _PUSH_CLAIMED + """
local want = tonumber(ARGV[4])
local cursor = '0-0'
local out = {}
local got = 0
repeat
  local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor,
                         'COUNT', want - got)
  cursor = res[1]
  for _, entry in ipairs(res[2]) do
    if push_claimed(out, entry) then got = got + 1 end
  end
until cursor == '0-0' or got >= want
return out
"""

# Reset the idle time of the ids (ARGV[3..]) that consumer ARGV[2] still holds in group
# ARGV[1], without counting a delivery (JUSTID); an id another consumer took is left alone.
_TOUCH = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# Per key with entries pending in group ARGV[1]: {key index, consumer, count} triples.
_HOLDERS = """
local out = {}
for i, key in ipairs(KEYS) do
  local summary = redis.call('XPENDING', key, ARGV[1])
  if summary[4] then
    for _, c in ipairs(summary[4]) do
      out[#out + 1] = i
      out[#out + 1] = c[1]
      out[#out + 1] = tonumber(c[2])
    end
  end
end
return out
"""

# XCLAIM exactly these ids (each only if still pending and idle >= ARGV[3]); ids no
# longer pending are skipped.
_CLAIM_IDS = _PUSH_CLAIMED + """
local out = {}
local res = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ARGV, 4))
for _, entry in ipairs(res) do push_claimed(out, entry) end
return out
"""

# Safe MINID = min over groups of (oldest pending id, else last-delivered-id + 1);
# nothing is trimmed when the stream has no group. Returns {dropped, minid}.
_TRIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local best_ms, best_seq = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
  local ms, seq
  if info['pending'] > 0 then
    ms, seq = parse(redis.call('XPENDING', KEYS[1], info['name'])[2])
  else
    ms, seq = parse(info['last-delivered-id'])
    seq = seq + 1
  end
  if best_ms == nil or ms < best_ms or (ms == best_ms and seq < best_seq) then
    best_ms, best_seq = ms, seq
  end
end
if best_ms == nil then return {0, ''} end
local minid = string.format('%.0f-%.0f', best_ms, best_seq)
local n
if ARGV[1] == '1' then
  n = redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
else
  n = redis.call('XTRIM', KEYS[1], 'MINID', minid)
end
return {n, minid}
"""

# Returns the fencing token, or 0 when another owner holds the lease.
_ACQUIRE = """
local cur = redis.call('HGET', KEYS[1], 'owner')
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'token'))
end
if cur then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
"""

# A lease without a fencing token (token 0): what needs only mutual exclusion (router slots,
# a dead-letter replay) leaves no `fence:` counter behind, which never expires.
_LOCK = """
local cur = redis.call('HGET', KEYS[1], 'owner')
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A batch of commits in one atomic script (the group commit). ARGV holds, per commit:
# lease key ('' = unfenced), token, guard cancel key, guard progress key, guard field
# ('' = none), number of commands, how many of them (at the end) are acks, then each
# command as its argument count followed by its arguments. A fenced commit whose lease no
# longer holds its token writes nothing; a guarded commit whose run is cancelled or whose
# progress field is done applies only its acks; a command that fails stops its own commit
# (the acks come last, so an input is never acknowledged without its outputs) and no
# other. Returns one status per commit: '' = applied, 'GUARDED', else the error.
_COMMIT = """
local out = {}
local i, c = 1, 0
while i <= #ARGV do
  c = c + 1
  local lease, token = ARGV[i], ARGV[i + 1]
  local cancel, prog, field = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local ncmd, nack = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  i = i + 7
  local status, first = '', 1
  if lease ~= '' and redis.call('HGET', lease, 'token') ~= token then
    status = 'FENCED lease ' .. lease .. ' no longer holds token ' .. token
  elseif cancel ~= '' then
    local done = false
    if field ~= '' then
      local p = redis.call('HGET', prog, field)
      done = p and string.sub(p, -5) == ':done'
    end
    if done or redis.call('EXISTS', cancel) == 1 then
      first = ncmd - nack + 1
    end
  end
  for k = 1, ncmd do
    local n = tonumber(ARGV[i])
    if status == '' and k >= first then
      local r = redis.pcall(unpack(ARGV, i + 1, i + n))
      if type(r) == 'table' and r.err then status = r.err end
    end
    i = i + n + 1
  end
  if status == '' and first > 1 then status = 'GUARDED' end
  out[c] = status
end
return out
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_HEARTBEAT = _NOW_MS + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# One request against a rate limit: orchestrator.ratelimit.gcra, in milliseconds. KEYS[1]
# holds the caller's TAT and expires when it is past (an idle caller costs nothing).
# ARGV: the interval (1000 / rate) and the burst. Returns '' when allowed, else the wait.
_RATE = _NOW_MS + """
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local over = new_tat - now - tonumber(ARGV[2]) * interval
-- a tolerance that grows with the burst: each addition to an epoch-ms TAT rounds to a
-- float step of 2.4e-4 ms, and a burst of b requests adds b of those roundings
if over > (tonumber(ARGV[2]) + 2) * 0.0005 then return string.format('%.17g', over) end
-- all 17 digits: tostring() keeps 14, which rounds an epoch-ms TAT to 0.1 ms, and over a
-- burst those roundings added up to refusing its last request
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return ''
"""

_MEMBERS = _NOW_MS + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(dead) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('HDEL', KEYS[2], m)
end
local out = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = m
  out[#out + 1] = redis.call('HGET', KEYS[2], m) or '{}'
end
return out
"""


def _progress_text(p: Progress) -> str:
    return f"{p.units}:done" if p.done else str(p.units)


def _parse_progress(text: str | None) -> Progress | None:
    if text is None:
        return None
    units, _, flag = text.partition(":")
    return Progress(int(units), flag == "done")


def _no_group(exc: ResponseError) -> bool:
    msg = str(exc)
    return msg.startswith("NOGROUP") or "no such key" in msg


@contextlib.contextmanager
def _group_errors(group: str, where: object) -> Iterator[None]:
    """Redis' NOGROUP (or no such stream) as the transport's NoGroupError, naming `where`."""
    try:
        yield
    except ResponseError as exc:
        if _no_group(exc):
            raise NoGroupError(f"no group {group!r} on {where!r}") from exc
        raise


class _Script:
    """A Lua script, re-sent once more when Redis says it does not know it.

    redis-py loads a script on NOSCRIPT and retries once; when a script's first use meets a
    Redis restart, that load lands on the old server and the retry on the new one, and the
    NOSCRIPT reached the caller (a worker died of it in the Redis-restart test). A second
    try loads it on the server that answered."""

    def __init__(self, client: aioredis.Redis, text: str) -> None:
        self._script = client.register_script(text)

    async def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self._script(keys=keys, args=args)
        except NoScriptError:
            return await self._script(keys=keys, args=args)


DEFAULT_PREFIX = "alto:"


def stream_key(stream: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The Redis key of a transport stream (`orchestrator.routing` names the streams). What
    reads Redis from outside, such as the Helm chart's KEDA triggers, must use the same."""
    return f"{prefix}stream:{stream}"


class RedisTransport(Transport):
    """`Transport` on Redis Streams (Redis >= 7.0). See the module docstring."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        max_connections: int = 64,
        pool_timeout_s: float = 30.0,
        approximate_trim: bool = True,
        cancel_staleness_ms: int = 10,
    ) -> None:
        # A blocking pool: a burst of blocked XREADGROUPs makes commits wait for a free
        # connection (bounded by block_ms) instead of failing with "Too many connections".
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        use_hiredis_packing(self._pool)
        self._r = aioredis.Redis.from_pool(self._pool)
        self.prefix = prefix
        self.approximate_trim = approximate_trim
        self._minid: dict[str, str] = {}  # stream -> last safe MINID computed by trim()
        self._commit_queue: list[tuple[list[str | bytes], asyncio.Future[bool]]] = []
        self._committing = False
        self._read_queue: list[tuple[str, list[str] | None, asyncio.Future[list[Any]]]] = []
        self._reading = False
        self._cancel_seen: dict[str, tuple[bool, float]] = {}  # run -> (cancelled, when read)
        self.cancel_staleness_s = cancel_staleness_ms / 1000
        self._rr = 0  # rotates multi-stream reads for fairness
        self._consume = _Script(self._r, _CONSUME)
        self._claim = _Script(self._r, _CLAIM)
        self._claim_ids = _Script(self._r, _CLAIM_IDS)
        self._holders = _Script(self._r, _HOLDERS)
        self._touch = _Script(self._r, _TOUCH)
        self._trim = _Script(self._r, _TRIM)
        self._acquire = _Script(self._r, _ACQUIRE)
        self._release = _Script(self._r, _RELEASE)
        self._lock = _Script(self._r, _LOCK)
        self._heartbeat = _Script(self._r, _HEARTBEAT)
        self._members = _Script(self._r, _MEMBERS)
        self._rate = _Script(self._r, _RATE)
        self._commit = _Script(self._r, _COMMIT)
        # NoScriptError too, should Redis restart again between `_Script`'s tries: the step
        # is retried later like any other, and that call loads the script again
        self.transient_errors = (RedisConnectionError, RedisTimeoutError, NoScriptError)

    # ---- keys ---------------------------------------------------------------------------
    def _stream_key(self, stream: str) -> str:
        return stream_key(stream, self.prefix)

    def _run_key(self, run: str, part: str) -> str:
        return f"{self.prefix}run:{run}:{part}"

    # ---- work streams -------------------------------------------------------------------
    async def ensure_group(self, stream: str, group: str) -> None:
        try:
            await self._r.xgroup_create(self._stream_key(stream), group, id="0", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def commit(self, commit: Commit) -> bool:
        """Group commit: while one batch is in flight, later commits queue and then go out
        together in the next one (one round trip and one script call for many runners; each
        commit stays atomic because the script is). No timers: an idle transport sends at
        once, a busy one batches by itself."""
        if not commit:
            return True
        args = self._commit_args(commit)  # serialise first: a bad value fails only this commit
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._commit_queue.append((args, fut))
        if not self._committing:
            self._committing = True
            asyncio.get_running_loop().create_task(self._flush_commits())
        return await fut

    def _commit_args(self, commit: Commit) -> list[str | bytes]:
        """The commit's section of `_COMMIT`'s ARGV: its fence and guard, the number of its
        commands and of its trailing acks, then each command as its length and its words,
        in the order they apply (acks last). Run keys get the safety expiry if they have
        none (EXPIRE NX). Written straight into one list: this runs for every input, and
        a list per command plus a second pass cost ~10 us of an instant stage's ~200."""
        fence, guard = commit.fence, commit.guard
        args: list[str | bytes] = [
            f"{self.prefix}lease:{fence.lease}" if fence else "",
            str(fence.token) if fence else "",
            self._run_key(guard.run, "cancel") if guard else "",
            self._run_key(guard.run, "progress") if guard else "",
            (guard.key or "") if guard else "",
            "",  # the number of commands, set below
            "",  # of acks
        ]
        n = 0
        for s, e in commit.messages:
            key = self._stream_key(s)
            minid = self._minid.get(key)
            if minid is None:
                args += ("5", "XADD", key, "*", "e", e.to_wire())
            elif self.approximate_trim:  # trim while appending, never past what trim() proved
                args += ("8", "XADD", key, "MINID", "~", minid, "*", "e", e.to_wire())
            else:
                args += ("7", "XADD", key, "MINID", minid, "*", "e", e.to_wire())
            n += 1
        run_keys: dict[str, None] = {}
        for run, ev in commit.events:
            key = self._run_key(run, "events")
            args += ("5", "XADD", key, "*", "e", dumps_json(ev))  # orjson: ~8x the stdlib
            run_keys[key] = None
            n += 1
        progress: dict[str, list[str]] = {}
        for run, field, prog in commit.progress:
            progress.setdefault(self._run_key(run, "progress"), []).extend(
                (field, _progress_text(prog)))
        for key, flat in progress.items():
            for i in range(0, len(flat), 2000):  # Lua's unpack() has a bounded stack
                chunk = flat[i:i + 2000]
                args += (str(len(chunk) + 2), "HSET", key)
                args += chunk
                n += 1
            run_keys[key] = None
        ttl = str(self.run_key_ttl_s)
        for key in run_keys:
            args += ("4", "EXPIRE", key, ttl, "NX")
            n += 1
        acks = 0
        for stream, group, ids in commit.acks:
            key = self._stream_key(stream)
            for i in range(0, len(ids), 1000):
                chunk = ids[i:i + 1000]
                args += (str(len(chunk) + 3), "XACK", key, group)
                args += chunk
                acks += 1
        args[5], args[6] = str(n + acks), str(acks)
        return args

    async def _flush_commits(self) -> None:
        try:
            while self._commit_queue:
                batch, self._commit_queue = self._commit_queue, []
                try:
                    statuses = await self._commit(
                        keys=[], args=[a for args, _ in batch for a in args]
                    )
                except BaseException as exc:  # lost connection etc.: every caller learns of it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), status in zip(batch, statuses, strict=True):
                    if fut.done():
                        continue
                    if not status or status == "GUARDED":
                        fut.set_result(not status)
                    elif status.startswith("FENCED"):
                        fut.set_exception(FencedError(status))
                    else:
                        fut.set_exception(ResponseError(status))
        finally:
            self._committing = False
            if self._commit_queue:  # arrived while we were failing out
                self._committing = True
                asyncio.get_running_loop().create_task(self._flush_commits())

    async def consume(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        if count < 1:
            raise ValueError("count must be at least 1")
        with _group_errors(group, list(streams)):
            if len(streams) == 1:
                return await self._consume_one(streams[0], group, consumer, count, block_ms)
            return await self._consume_many(streams, group, consumer, count, block_ms)

    async def _consume_one(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        # block=None means no BLOCK argument; BLOCK 0 would mean "forever" to Redis.
        res = await self._r.xreadgroup(
            group, consumer, {self._stream_key(stream): ">"}, count=count,
            block=block_ms if block_ms > 0 else None,
        )
        out: list[Delivery] = []
        for _key, entries in res or []:
            for entry_id, fields in entries:
                out.append(Delivery(stream, entry_id, Envelope.from_json(fields["e"]), 1))
        return out

    async def _consume_many(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        self._rr += 1
        k = self._rr % len(streams)
        names = [*streams[k:], *streams[:k]]
        keys = [self._stream_key(s) for s in names]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            flat, tails = await self._consume(keys=keys, args=[group, consumer, count])
            if flat:
                return [
                    Delivery(names[int(flat[i]) - 1], flat[i + 1], Envelope.from_json(flat[i + 2]))
                    for i in range(0, len(flat), 3)
                ]
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                return []
            # Wait for anything newer than what the group has seen, without taking it.
            await self._r.xread(dict(zip(keys, tails, strict=True)), count=1,
                                block=remaining_ms)

    async def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:  # rides the group commit: one round trip with everything else
            await self.commit(Commit(acks=[(stream, group, list(entry_ids))]))

    async def claim_abandoned(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Delivery]:
        if count < 1:
            raise ValueError("count must be at least 1")
        with _group_errors(group, stream):
            flat = await self._claim(
                keys=[self._stream_key(stream)], args=[group, consumer, min_idle_ms, count]
            )
        return [
            Delivery(stream, flat[i], Envelope.from_json(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    async def pending_consumers(
        self, streams: Sequence[str], group: str
    ) -> dict[str, dict[str, int]]:
        if not streams:
            return {}
        with _group_errors(group, list(streams)):
            flat = await self._holders(keys=[self._stream_key(s) for s in streams],
                                       args=[group])
        out: dict[str, dict[str, int]] = {}
        for i in range(0, len(flat), 3):
            out.setdefault(streams[int(flat[i]) - 1], {})[flat[i + 1]] = int(flat[i + 2])
        return out

    async def pending(
        self, stream: str, group: str, count: int, *, min_idle_ms: int = 0,
        consumer: str | None = None,
    ) -> list[PendingEntry]:
        if count < 1:
            raise ValueError("count must be at least 1")
        with _group_errors(group, stream):
            rows = await self._r.xpending_range(
                self._stream_key(stream), group, "-", "+", count,
                consumername=consumer, idle=min_idle_ms if min_idle_ms > 0 else None,
            )
        return [
            PendingEntry(r["message_id"], r["consumer"], int(r["time_since_delivered"]),
                         int(r["times_delivered"]))
            for r in rows
        ]

    async def claim(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str],
        min_idle_ms: int,
    ) -> list[Delivery]:
        ids = sorted(set(entry_ids), key=_id_order)
        out: list[Delivery] = []
        for i in range(0, len(ids), 1000):  # Lua's unpack has a stack limit
            with _group_errors(group, stream):
                flat = await self._claim_ids(
                    keys=[self._stream_key(stream)],
                    args=[group, consumer, max(0, min_idle_ms), *ids[i:i + 1000]],
                )
            out.extend(
                Delivery(stream, flat[j], Envelope.from_json(flat[j + 1]), int(flat[j + 2]))
                for j in range(0, len(flat), 3)
            )
        return out

    async def touch(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str]
    ) -> int:
        ids = list(dict.fromkeys(entry_ids))
        n = 0
        for i in range(0, len(ids), 1000):  # Lua's unpack/argument limits
            with _group_errors(group, stream):
                n += int(await self._touch(keys=[self._stream_key(stream)],
                                           args=[group, consumer, *ids[i:i + 1000]]))
        return n

    async def length(self, stream: str) -> int:
        return int(await self._r.xlen(self._stream_key(stream)))

    async def stats(self, stream: str, group: str) -> StreamStats:
        key = self._stream_key(stream)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.xlen(key)
            pipe.xinfo_groups(key)
            # each reply as it is: redis-py's pipeline error for the first failed command
            # does not always carry Redis' message, and "no such key" must be told apart
            length, groups = await pipe.execute(raise_on_error=False)
        if isinstance(groups, ResponseError):
            if _no_group(groups) or length == 0:  # no stream (XLEN says 0): no group either
                raise NoGroupError(f"no group {group!r} on {stream!r}") from groups
            raise groups
        info = next((g for g in groups if g["name"] == group), None)
        if info is None:
            raise NoGroupError(f"no group {group!r} on stream {stream!r}")
        lag = info.get("lag")
        read = info.get("entries-read")
        if read is None and lag is not None:
            # no counter yet (a group created at an id, before its first read), but Redis
            # could place the group in the stream's history: that place is the count
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.xinfo_stream(key)
                pipe.xinfo_groups(key)
                stream_info, groups = await pipe.execute()
            again = next(g for g in groups if g["name"] == group)
            read, lag_now = again.get("entries-read"), again.get("lag")
            if read is None and lag_now is not None:
                read = int(stream_info["entries-added"]) - int(lag_now)
        if lag is None:
            # Redis reports no lag when it cannot compute it cheaply (e.g. after XDEL);
            # count what lies beyond the group's last-delivered id instead.
            lag = len(await self._r.xrange(key, min=f"({info['last-delivered-id']}", max="+"))
        # Redis 7.0 can over-report lag after an AOF reload of a trimmed stream (seen in
        # the soak: lag in the thousands on an empty stream); what the group has not been
        # delivered can never exceed what the stream holds beyond the group's pending list
        lag = max(0, min(int(lag), int(length) - int(info["pending"])))
        return StreamStats(length=int(length), pending=int(info["pending"]), lag=lag,
                           entries_read=None if read is None else int(read))

    async def trim(self, stream: str) -> int:
        key = self._stream_key(stream)
        dropped, minid = await self._trim(
            keys=[key], args=["1" if self.approximate_trim else "0"]
        )
        if minid:
            self._minid[key] = minid
        return int(dropped)

    # ---- progress -----------------------------------------------------------------------
    async def get_progress(self, run: str, keys: Sequence[str]) -> list[Progress | None]:
        """Coalesced like commits: concurrent reads share one pipeline, and each also reads
        the run's cancel flag, so the runner's cancel check that follows is free."""
        if not keys:
            return []
        values = await self._read(run, list(keys))
        return [_parse_progress(v) for v in values]

    async def _read(self, run: str, keys: list[str] | None) -> list[Any]:
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._read_queue.append((run, keys, fut))
        if not self._reading:
            self._reading = True
            asyncio.get_running_loop().create_task(self._flush_reads())
        return await fut

    async def _flush_reads(self) -> None:
        try:
            while self._read_queue:
                batch, self._read_queue = self._read_queue, []
                runs: dict[str, list[str]] = {}  # one HMGET and one EXISTS per run
                for run, keys, _ in batch:
                    runs.setdefault(run, []).extend(k for k in keys or () if k not in runs[run])
                try:
                    async with self._r.pipeline(transaction=False) as pipe:
                        for run, keys in runs.items():
                            if keys:
                                pipe.hmget(self._run_key(run, "progress"), keys)
                            pipe.exists(self._run_key(run, "cancel"))
                        res = await pipe.execute()
                except Exception as exc:
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                now = time.monotonic()
                found: dict[str, dict[str, Any]] = {}
                i = 0
                for run, keys in runs.items():
                    if keys:
                        found[run] = dict(zip(keys, res[i], strict=True))
                        i += 1
                    self._cancel_seen[run] = (bool(res[i]), now)
                    i += 1
                for run, keys, fut in batch:
                    if not fut.done():
                        fut.set_result([found[run][k] for k in keys or ()])
        finally:
            self._reading = False
            if len(self._cancel_seen) > 100_000:
                self._cancel_seen.clear()

    # ---- run events ---------------------------------------------------------------------
    async def read_events(
        self, run: str, after: str | None, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        if count < 1:
            raise ValueError("count must be at least 1")
        res = await self._r.xread(
            {self._run_key(run, "events"): after or "0-0"}, count=count,
            block=block_ms if block_ms > 0 else None,  # BLOCK 0 would wait forever
        )
        return [
            (entry_id, loads_json(fields["e"]))
            for _key, entries in res or []
            for entry_id, fields in entries
        ]

    async def read_events_many(
        self, after: Mapping[str, str | None], count: int
    ) -> dict[str, list[tuple[str, dict[str, Any]]] | Exception]:
        # one pipeline of single-key XREADs: one round trip, and unlike a multi-key XREAD
        # each command names one key, as a Redis Cluster client would need
        if count < 1:
            raise ValueError("count must be at least 1")
        runs = list(after)
        if not runs:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.xread({self._run_key(run, "events"): after[run] or "0-0"}, count=count)
            replies = await pipe.execute(raise_on_error=False)
        out: dict[str, list[tuple[str, dict[str, Any]]] | Exception] = {}
        for run, reply in zip(runs, replies, strict=True):
            if isinstance(reply, self.transient_errors):
                raise reply
            if isinstance(reply, Exception):
                out[run] = reply
                continue
            try:
                out[run] = [(entry_id, loads_json(fields["e"]))
                            for _key, entries in reply or [] for entry_id, fields in entries]
            except Exception as exc:  # noqa: BLE001 - an entry that cannot be decoded
                out[run] = exc
        return out

    async def last_event_id(self, run: str) -> str | None:
        got = await self._r.xrevrange(self._run_key(run, "events"), count=1)
        return str(got[0][0]) if got else None

    async def expire_run(self, run: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            self._cancel_seen.pop(run, None)
        async with self._r.pipeline(transaction=True) as pipe:
            for part in ("events", "progress", "cancel"):
                pipe.expire(self._run_key(run, part), ttl_s)
            await pipe.execute()

    # ---- control ------------------------------------------------------------------------
    async def cancel(self, run: str, ttl_s: int = 3600) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        await self._r.set(self._run_key(run, "cancel"), "1", ex=ttl_s)
        self._cancel_seen[run] = (True, time.monotonic())

    async def is_cancelled(self, run: str) -> bool:
        """Answered from a read at most `cancel_staleness_ms` old (a progress read brings
        one along), else read (coalesced with other reads)."""
        seen = self._cancel_seen.get(run)
        if seen is not None and (seen[0] or time.monotonic() - seen[1] <= self.cancel_staleness_s):
            return seen[0]
        await self._read(run, None)
        return self._cancel_seen[run][0]

    # ---- leases and registry ------------------------------------------------------------
    async def acquire_fenced(self, name: str, owner: str, ttl_ms: int) -> int | None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        token = await self._acquire(
            keys=[f"{self.prefix}lease:{name}", f"{self.prefix}fence:{name}"], args=[owner, ttl_ms]
        )
        return int(token) or None

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        return bool(await self._lock(keys=[f"{self.prefix}lease:{name}"], args=[owner, ttl_ms]))

    async def release_lease(self, name: str, owner: str) -> None:
        await self._release(keys=[f"{self.prefix}lease:{name}"], args=[owner])

    def _member_keys(self, group: str) -> list[str]:
        return [f"{self.prefix}members:{group}", f"{self.prefix}memberinfo:{group}"]

    async def heartbeat(self, group: str, member: str, info: dict[str, Any], ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        text = json.dumps(info, separators=(",", ":"), ensure_ascii=False)
        await self._heartbeat(keys=self._member_keys(group), args=[member, ttl_ms, text])

    async def members(self, group: str) -> dict[str, dict[str, Any]]:
        flat = await self._members(keys=self._member_keys(group), args=[])
        return {flat[i]: json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def leave(self, group: str, member: str) -> None:
        zkey, hkey = self._member_keys(group)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zrem(zkey, member)
            pipe.hdel(hkey, member)
            await pipe.execute()

    # ---- rate limit ---------------------------------------------------------------------
    async def take_token(self, key: str, rate: float, burst: int) -> float:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        over = await self._rate(keys=[f"{self.prefix}ratelimit:{key}"],
                                args=[repr(1000.0 / rate), burst])
        return float(over) / 1000.0 if over else 0.0

    # ---- small shared state -------------------------------------------------------------
    async def hincr(self, key: str, fields: dict[str, float]) -> None:
        values = {name: float(v) for name, v in fields.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError(f"hincr on {key!r} with a non-finite increment")
        if not values:
            return
        async with self._r.pipeline(transaction=True) as pipe:
            for name, v in values.items():
                pipe.hincrbyfloat(f"{self.prefix}h:{key}", name, v)
            await pipe.execute()

    async def hgetall(self, key: str) -> dict[str, float]:
        raw = await self._r.hgetall(f"{self.prefix}h:{key}")
        return {name: float(v) for name, v in raw.items()}

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()
