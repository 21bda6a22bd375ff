"""Scheduling policies for LM stages: where each prompt should run (pure logic, no I/O).

DESIGN.md asks LM stages to keep requests that share a prompt prefix on one instance (so
the instance's KV/prefix cache is reused) without letting any instance be overloaded.
This module holds every *decision* of that, so it can be tested without a transport; the
runtime side (workers/router.py) only feeds it numbers and turns its answers into stream
names. Five policies share one interface:

* ``pull``: one shared stream, instances pull when they have a free slot (join the
  shortest queue for free). No placement at all; the runtime default.
* ``round_robin`` / ``least_loaded`` / ``cache_aware``: the *producer* picks an instance
  for each message and publishes it on that instance's lane (one stream per instance
  slot). ``cache_aware`` is SGLang's router policy (see `CacheAwarePolicy`).
* ``prompt_aware``: the producer only *classifies* a prompt (`PrefixClassifier`) and
  publishes it on its class lane (one stream per class bucket); a planner bin-packs class
  demand onto instances (`pack`, `PromptAwarePlanner`; where engines announce their
  prefix-cache size, priced with the misses each placement causes: `CacheModel`) and
  every instance reads the lanes it was given. Because placement lives on the consumer
  side, a producer never needs fresh load numbers, and a lane's backlog moves with the
  lane when the plan changes.

Every non-pull policy also lets an under-used instance *steal* from other lanes
(`may_steal`): an idle instance is never left idle while work waits, whatever the
placement says, and a lane whose owner died is still drained.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PULL = "pull"
ROUND_ROBIN = "round_robin"
LEAST_LOADED = "least_loaded"
CACHE_AWARE = "cache_aware"
PROMPT_AWARE = "prompt_aware"
POLICIES: tuple[str, ...] = (PULL, ROUND_ROBIN, LEAST_LOADED, CACHE_AWARE, PROMPT_AWARE)
# policies where the producer picks an instance (and publishes on that instance's lane)
DIRECTED: frozenset[str] = frozenset({ROUND_ROBIN, LEAST_LOADED, CACHE_AWARE})

_OVERRIDE_ITEM = re.compile(r"^\s*(?:([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*)?([a-z_]+)\s*$")


# ------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedOptions:
    """Knobs of every policy, with the defaults the runtime uses.

    The cache-aware defaults are SGLang router's `CacheAwareConfig::default()`
    (sgl-project/sglang, sgl-router/src/policies/mod.rs): cache_threshold 0.5,
    balance_abs_threshold 32, balance_rel_threshold 1.1, eviction every 30 s,
    max_tree_size 10000 (characters per worker; later releases raised it to 2**26).
    """

    lanes: int = 128  # class buckets of a prompt_aware stage (one stream each)
    slots: int = 16  # instance slots of a directed stage (one stream each)
    # prompt classification
    chunk_chars: int = 128  # prefix granularity of the classifier (~32 tokens)
    min_count: int = 3  # a prefix is "shared" once this many prompts had it
    max_chunks: int = 256  # look at most this far into a prompt (32k characters)
    classifier_nodes: int = 200_000  # LRU bound on remembered prefixes
    # cache_aware (SGLang)
    cache_threshold: float = 0.5
    balance_abs_threshold: float = 32
    balance_rel_threshold: float = 1.1
    eviction_interval_s: float = 30.0
    max_tree_chars: int = 10_000
    # prompt_aware planning
    slack: float = 0.10  # an instance may hold this much more than its fair share
    drift: float = 0.25  # re-plan when the planned max/share exceeds 1 + drift
    half_life_s: float = 4.0  # half-life of the per-class arrival rates
    cost_half_life_s: float = 20.0  # half-life of the per-class means (tokens, seconds)
    demand_model: str = "tokens"  # "tokens" or "seconds" (see PromptAwarePlanner)
    prefill_weight: float = 0.15  # decode-slot steps per uncached prompt token (see planner)
    min_replan_s: float = 2.0  # at most one drift re-plan per this interval
    new_lane_share: float = 0.02  # unplanned lanes above this share of demand force a re-plan
    # re-plan hysteresis against noise in the rate estimates (see PromptAwarePlanner)
    # effective arrivals before a new lane forces a re-plan; 0 = at once. Off by default:
    # at 4, rare classes of skew-K16 stayed unplanned for ~20 s after a cold start in some
    # runs (hit rate 0.6 instead of 0.95); see PromptAwarePlanner
    min_class_arrivals: float = 0.0
    # drift must exceed the bound by this many standard errors (capped); 0 = the plain
    # bound. Off by default: see PromptAwarePlanner for the K16 cold starts it hurt
    drift_z: float = 0.0
    # stealing
    steal_below: float = 0.5  # prompt_aware: take cold work while inflight < this share
    steal_batch: int = 4  # take at most this many per steal
    steal_poll_ms: int = 20  # how often an instance that may steal looks for work
    warm_s: float = 5.0  # a lane served this recently counts as cached (warm) here
    plan_ttl_ms: int = 86_400_000  # a stored plan outlives its planner by this much


def parse_policy_override(text: str | None) -> dict[str, str]:
    """ALTO_POLICY: "prompt_aware" (every LM stage) or "claims=pull,verify=cache_aware".

    The key "*" holds the value for every stage; a named stage wins over it.
    """
    out: dict[str, str] = {}
    if not text or not text.strip():
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        m = _OVERRIDE_ITEM.match(part)
        if m is None or m.group(2) not in POLICIES:
            raise ValueError(
                f"ALTO_POLICY: cannot read {part.strip()!r}; expected one of {list(POLICIES)}, "
                f"optionally as stage=policy"
            )
        out[m.group(1) or "*"] = m.group(2)
    return out


def effective_policy(
    kind: str, aggregates: bool, spec_policy: str, stage: str, override: Mapping[str, str]
) -> str:
    """The policy a stage really runs: only stateless LM stages are placed by a policy
    (an aggregating stage is already pinned to partition owners; tools have no cache)."""
    if kind != "lm" or aggregates:
        return PULL
    return override.get(stage, override.get("*", spec_policy))


# ------------------------------------------------------------------------------------------
# hashing helpers
# ------------------------------------------------------------------------------------------


def stable_hash(data: str | bytes) -> int:
    """A 64-bit hash that is the same in every process (str's hash() is salted)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def rendezvous(key: str | int, candidates: Iterable[str]) -> str | None:
    """Highest-random-weight choice: every process agrees, and removing one candidate
    only moves the keys it had."""
    best: str | None = None
    best_w = -1
    for c in candidates:
        w = stable_hash(f"{key}|{c}")
        if w > best_w or (w == best_w and best is not None and c < best):
            best, best_w = c, w
    return best


def slot_name(index: int) -> str:
    return f"s{index}"


# ------------------------------------------------------------------------------------------
# prompt classification
# ------------------------------------------------------------------------------------------


class PrefixClassifier:
    """Names the class of a prompt: its longest prefix that other prompts share.

    Prompts are cut into `chunk_chars`-character chunks; the key of chunk i hashes the
    whole prefix up to it (a hash chain), so equal keys mean equal prefixes. Per key, an
    LRU map (so suffixes seen once are forgotten) keeps how many prompts had that prefix
    and how many popular (seen `min_count` times) two-chunk extensions it has.

    The class of a prompt: take the deepest popular prefix on its path (the longest
    prefix it shares with earlier prompts: system prompt, few-shot block, ...).

    * If that prefix is a branch point of popular prefixes (a system prompt that known
      classes continue with their own few-shot blocks), the prompt is a new or rare class
      leaving the known ones there: it is named by its own first chunk after the branch
      point (even if seen once), so it gets a lane of its own at once. Extensions count
      only when two chunks deep: one popular chunk may be a chance match of suffixes
      (many prompts whose suffix starts "Request 14..."), a popular chain of two is a
      class.
    * Otherwise the prompt continues a known class (what follows is its own suffix): walk
      back up while the parent prefix was seen (almost) only as often, to the first chunk
      after the last branch point, and name the class by that chunk. A segment of one
      chunk is skipped the same way (suffixes that match by chance), so a class is never
      split by the first characters of its requests.

    Both cases give a class the same name from its first request to its thousandth (the
    first chunk after the point where it leaves every other class), so its lane never
    changes. A prompt that shares nothing yet is named by its first chunk; one shorter
    than a chunk by `root` (the hash of the stage's template).
    """

    def __init__(
        self,
        *,
        chunk_chars: int = 128,
        min_count: int = 3,
        max_chunks: int = 256,
        max_nodes: int = 200_000,
        tolerance: float = 0.05,
    ) -> None:
        if chunk_chars < 1 or min_count < 1 or max_chunks < 1 or max_nodes < 1:
            raise ValueError("classifier sizes must be >= 1")
        self.chunk_chars = chunk_chars
        self.min_count = min_count
        self.max_chunks = max_chunks
        self.max_nodes = max_nodes
        self.tolerance = tolerance
        # key -> [prompts with this prefix, popular two-chunk extensions]
        self._nodes: OrderedDict[int, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._nodes)

    def count(self, prefix_key: int) -> int:
        node = self._nodes.get(prefix_key)
        return node[0] if node else 0

    def chain(self, text: str) -> list[int]:
        """Keys of the full chunks of `text` (each names the prefix up to its end).

        CRC-32 and Adler-32 are both incremental (the checksum of a prefix extends to the
        next chunk in O(chunk)), so the whole chain costs one pass over the prompt in C;
        together they make a 64-bit key, the same in every process. A collision merges
        two prefixes' counts, which can only make two classes share a lane.
        """
        c = self.chunk_chars
        raw = text[: self.max_chunks * c].encode("utf-8", "surrogatepass")
        crc, adler = 0, 1
        keys: list[int] = []
        for start in range(0, len(raw) - c + 1, c):
            piece = raw[start : start + c]
            crc = zlib.crc32(piece, crc)
            adler = zlib.adler32(piece, adler)
            keys.append((crc << 32) | adler)
        return keys

    def peek(self, text: str, root: Hashable = 0) -> Hashable:
        """The class `classify` would return, without counting this prompt."""
        return self._decide(self.chain(text), root)

    def classify(self, text: str, root: Hashable = 0) -> Hashable:
        """The class of `text` (decided on the prompts seen before it); then count it."""
        keys = self.chain(text)
        cls = self._decide(keys, root)
        nodes = self._nodes
        for i, k in enumerate(keys):
            node = nodes.get(k)
            if node is None:
                node = nodes[k] = [0, 0]
            else:
                nodes.move_to_end(k)
            node[0] += 1
            if node[0] == self.min_count and i > 1:
                parent = nodes.get(keys[i - 1])
                grand = nodes.get(keys[i - 2])
                if parent is not None and parent[0] >= self.min_count and grand is not None:
                    grand[1] += 1
        while len(nodes) > self.max_nodes:
            nodes.popitem(last=False)
        return cls

    def _decide(self, keys: list[int], root: Hashable) -> Hashable:
        if not keys:
            return root
        nodes = [self._nodes.get(k) for k in keys]
        counts = [n[0] if n else 0 for n in nodes]
        deepest = -1
        for i in range(len(counts) - 1, -1, -1):
            if counts[i] >= self.min_count:
                deepest = i
                break
        if deepest < 0:
            return keys[0]
        node = nodes[deepest]
        if node is not None and node[1] > 0 and deepest + 1 < len(keys):
            return keys[deepest + 1]  # leaves the known classes here: a class of its own
        while True:
            limit = counts[deepest] * (1 + self.tolerance)
            j = deepest
            while j > 0 and counts[j - 1] <= limit:
                j -= 1
            if deepest - j + 1 >= 2 or j == 0:
                return keys[j]
            # a one-chunk segment is suffixes matching by chance, not a class: go on above
            deepest = j - 1


def lane_of(cls: Hashable, lanes: int) -> int:
    """The lane (stream) of a class: a fixed hash, so every producer agrees unasked."""
    return stable_hash(repr(cls)) % lanes


# ------------------------------------------------------------------------------------------
# baselines: round robin, least loaded
# ------------------------------------------------------------------------------------------


class RoundRobinPolicy:
    """Cycle through the live instances in name order."""

    name = ROUND_ROBIN

    def __init__(self) -> None:
        self._next = 0

    def choose(self, instances: Sequence[str]) -> str:
        if not instances:
            raise ValueError("no instance to choose from")
        ordered = sorted(instances)
        pick = ordered[self._next % len(ordered)]
        self._next += 1
        return pick


class LeastLoadedPolicy:
    """Join the shortest queue: the instance with the least work (queued + running).

    Ties rotate, so equal (or equally stale) loads do not all land on the first name.
    """

    name = LEAST_LOADED

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, loads: Mapping[str, float]) -> str:
        if not loads:
            raise ValueError("no instance to choose from")
        low = min(loads.values())
        tied = sorted(i for i, v in loads.items() if v == low)
        self._turn += 1
        return tied[self._turn % len(tied)]


# ------------------------------------------------------------------------------------------
# baseline: SGLang's cache-aware router
# ------------------------------------------------------------------------------------------


def _lcp(a: str, a0: int, b: str) -> int:
    """Length of the common prefix of a[a0:] and b, by halving (slice compares run in C)."""
    n = min(len(a) - a0, len(b))
    if a[a0 : a0 + n] == b[:n]:
        return n
    lo, hi = 0, n  # a[a0:a0+lo] == b[:lo]; a[a0:a0+hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[a0 + lo : a0 + mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    __slots__ = ("children", "text", "tenants", "parent")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.children: dict[str, _Node] = {}
        self.text = text
        self.tenants: dict[str, int] = {}  # tenant -> last access tick (insertion ordered)
        self.parent = parent


class ApproxPrefixTree:
    """SGLang router's approximate multi-tenant radix tree, on characters.

    Port of sgl-project/sglang `sgl-router/src/policies/tree.rs`: one radix tree over
    request texts; every node remembers which tenants (instances) were sent a text
    through it and when; `prefix_match` returns the matched length and the first tenant
    of the deepest matched node; `evict` drops least-recently-used leaves of a tenant
    until its character count is at most `max_chars` (the router runs it every
    `eviction_interval_secs`). A logical clock replaces wall time.
    """

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.tenant_chars: dict[str, int] = {}
        self._tick = 0

    def _now(self) -> int:
        self._tick += 1
        return self._tick

    def add_tenant(self, tenant: str) -> None:
        self.insert("", tenant)

    def _touch(self, node: _Node, tenant: str, now: int) -> None:
        if tenant not in node.tenants:
            self.tenant_chars[tenant] = self.tenant_chars.get(tenant, 0) + len(node.text)
        node.tenants[tenant] = now

    def insert(self, text: str, tenant: str) -> None:
        now = self._now()
        node = self.root
        self._touch(node, tenant, now)
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                new = _Node(text[i:], node)
                node.children[text[i]] = new
                self._touch(new, tenant, now)
                return
            shared = _lcp(text, i, child.text)
            if shared < len(child.text):
                # split: node -> mid(child.text[:shared]) -> child(rest)
                mid = _Node(child.text[:shared], node)
                mid.tenants = dict(child.tenants)
                child.text = child.text[shared:]
                child.parent = mid
                mid.children[child.text[0]] = child
                node.children[text[i]] = mid
                child = mid
            self._touch(child, tenant, now)
            node = child
            i += shared

    def prefix_match(self, text: str, live: Iterable[str] | None = None) -> tuple[int, str | None]:
        """(matched characters, first tenant of the deepest matched node).

        `live` restricts the answer to tenants still alive (SGLang drops a stale tenant
        from the tree when it is picked; the runtime removes dead tenants instead).
        """
        alive = set(live) if live is not None else None
        node = self.root
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            shared = _lcp(text, i, child.text)
            i += shared
            node = child
            if shared < len(child.text):
                break
        tenant = next((t for t in node.tenants if alive is None or t in alive), None)
        if tenant is not None:
            now = self._now()
            walk: _Node | None = node
            while walk is not None:
                if tenant in walk.tenants:
                    walk.tenants[tenant] = now
                walk = walk.parent
        return i, tenant

    def smallest_tenant(self, among: Iterable[str]) -> str:
        """The tenant with the fewest characters cached (SGLang: `get_smallest_tenant`)."""
        return min(among, key=lambda t: (self.tenant_chars.get(t, 0), t))

    def remove_tenant(self, tenant: str) -> None:
        order: list[_Node] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children before parents: empty chains go at once
            node.tenants.pop(tenant, None)
            if node is not self.root and not node.tenants and not node.children:
                self._unlink(node)
        self.tenant_chars.pop(tenant, None)

    def _unlink(self, node: _Node) -> None:
        parent = node.parent
        if parent is not None and parent.children.get(node.text[:1]) is node:
            del parent.children[node.text[:1]]

    def evict(self, max_chars: int) -> int:
        """Drop LRU leaves per tenant until each holds <= max_chars; returns chars dropped."""
        import heapq

        heap: list[tuple[int, int, str, _Node]] = []
        seq = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            for tenant, ts in node.tenants.items():
                if node is not self.root and not any(
                    tenant in c.tenants for c in node.children.values()
                ):
                    heap.append((ts, seq, tenant, node))
                    seq += 1
        heapq.heapify(heap)
        dropped = 0
        while heap:
            _ts, _, tenant, node = heapq.heappop(heap)
            if self.tenant_chars.get(tenant, 0) <= max_chars:
                continue
            if tenant not in node.tenants:
                continue
            del node.tenants[tenant]
            self.tenant_chars[tenant] -= len(node.text)
            dropped += len(node.text)
            parent = node.parent
            if not node.tenants and not node.children:
                self._unlink(node)
            if (
                parent is not None
                and parent is not self.root
                and tenant in parent.tenants
                and not any(tenant in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], seq, tenant, parent))
                seq += 1
        return dropped


class CacheAwarePolicy:
    """SGLang router's cache-aware policy (the baseline DESIGN.md names).

    Port of sgl-project/sglang `sgl-router/src/policies/cache_aware.rs`
    (`CacheAwarePolicy::select_worker`):

    1. loads are the per-worker counts of outstanding requests; the system is
       *imbalanced* when ``max - min > balance_abs_threshold`` **and**
       ``max > min * balance_rel_threshold``; then the request goes to the least
       loaded worker (and is still inserted into the tree under that worker);
    2. otherwise the approximate tree finds the worker with the longest prefix match; if
       ``matched / len(text) > cache_threshold`` the request goes there, else to the
       worker with the smallest tree (most free cache); the text is inserted for it;
    3. every `eviction_interval_secs` the tree evicts LRU leaves down to `max_tree_size`
       characters per worker (`maybe_evict`).
    """

    name = CACHE_AWARE

    def __init__(
        self,
        *,
        cache_threshold: float = 0.5,
        balance_abs_threshold: float = 32,
        balance_rel_threshold: float = 1.1,
        max_tree_chars: int = 10_000,
        eviction_interval_s: float = 30.0,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_chars = max_tree_chars
        self.eviction_interval_s = eviction_interval_s
        self.tree = ApproxPrefixTree()
        self._last_evict: float | None = None
        self.balanced_picks = 0  # decisions by load (imbalanced system)
        self.cache_picks = 0  # decisions by prefix match
        self.smallest_picks = 0  # decisions by smallest tree (match below threshold)

    def imbalanced(self, loads: Mapping[str, float]) -> bool:
        hi, lo = max(loads.values()), min(loads.values())
        return hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold

    def choose(self, text: str, loads: Mapping[str, float]) -> str:
        if not loads:
            raise ValueError("no instance to choose from")
        for tenant in loads:
            if tenant not in self.tree.tenant_chars:
                self.tree.add_tenant(tenant)
        if self.imbalanced(loads):
            pick = min(sorted(loads), key=lambda t: loads[t])
            self.balanced_picks += 1
        else:
            matched, tenant = self.tree.prefix_match(text, live=loads)
            rate = matched / len(text) if text else 0.0
            if tenant is not None and rate > self.cache_threshold:
                pick = tenant
                self.cache_picks += 1
            else:
                pick = self.tree.smallest_tenant(loads)
                self.smallest_picks += 1
        self.tree.insert(text, pick)
        return pick

    def forget(self, keep: Iterable[str]) -> None:
        """Remove every tenant not in `keep` (instances that left)."""
        alive = set(keep)
        for tenant in [t for t in self.tree.tenant_chars if t not in alive]:
            self.tree.remove_tenant(tenant)

    def maybe_evict(self, now: float) -> bool:
        if self._last_evict is None:
            self._last_evict = now
            return False
        if now - self._last_evict < self.eviction_interval_s:
            return False
        self._last_evict = now
        self.tree.evict(self.max_tree_chars)
        return True


# ------------------------------------------------------------------------------------------
# prompt-aware placement
# ------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Which instances read which class lanes; lanes not listed go to `default_owner`."""

    epoch: int = 0
    owners: dict[int, tuple[str, ...]] = field(default_factory=dict)
    planned: dict[str, float] = field(default_factory=dict)  # demand per instance
    demand: dict[int, float] = field(default_factory=dict)  # demand per lane when planned
    members: tuple[str, ...] = ()  # the live instances it was made for
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "members": list(self.members),
            "owners": {str(k): list(v) for k, v in self.owners.items()},
            "planned": self.planned,
            "demand": {str(k): v for k, v in self.demand.items()},
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Placement:
        return cls(
            epoch=int(data.get("epoch", 0)),
            owners={int(k): tuple(v) for k, v in dict(data.get("owners", {})).items()},
            planned={str(k): float(v) for k, v in dict(data.get("planned", {})).items()},
            demand={int(k): float(v) for k, v in dict(data.get("demand", {})).items()},
            members=tuple(str(m) for m in data.get("members", ())),
            reason=str(data.get("reason", "")),
        )

    def instances(self) -> set[str]:
        return {i for owners in self.owners.values() for i in owners}


_DEFAULT_OWNERS: dict[tuple[int, tuple[str, ...]], str | None] = {}


def default_owner(lane: int, live: Iterable[str]) -> str | None:
    """Rendezvous owner of a lane no plan covers (memoised: asked for every lane at every
    refresh and read, with the same few live sets)."""
    key = (lane, tuple(live))
    owner = _DEFAULT_OWNERS.get(key)
    if owner is None and key not in _DEFAULT_OWNERS:
        if len(_DEFAULT_OWNERS) > 100_000:
            _DEFAULT_OWNERS.clear()
        owner = _DEFAULT_OWNERS[key] = rendezvous(f"lane{lane}", key[1])
    return owner


def lane_owners(lane: int, owners: Mapping[int, Sequence[str]], live: Sequence[str]) -> list[str]:
    """Live owners of a lane: the planned ones still alive, else the rendezvous default.

    Never empty while any instance lives: no lane (no class) can be left without a
    reader, whatever the plan says and whoever died since it was made.
    """
    alive = [o for o in owners.get(lane, ()) if o in live]
    if alive:
        return alive
    d = default_owner(lane, live)
    return [d] if d is not None else []


def owned_lanes(
    me: str, owners: Mapping[int, Sequence[str]], live: Sequence[str], lanes: int
) -> list[int]:
    """Lanes `me` reads as an owner; sole-owned lanes first (they wait for nobody else)."""
    mine: list[tuple[int, int]] = []
    for lane in range(lanes):
        who = lane_owners(lane, owners, live)
        if me in who:
            mine.append((len(who), lane))
    return [lane for _, lane in sorted(mine)]


def pack(
    demand: Mapping[int, float],
    capacity: Mapping[str, float],
    previous: Mapping[int, Sequence[str]] | None = None,
    *,
    footprint: Mapping[int, float] | None = None,
    slack: float = 0.10,
    keep_slack: float | None = None,
) -> dict[int, tuple[str, ...]]:
    """Greedy bin-packing of lane (class) demand onto instances, bounded by load.

    Lanes are taken largest first (LPT). Each instance may hold up to its capacity share
    of the total demand times (1 + slack). A lane keeps its previous owner(s) while they
    stay within (1 + keep_slack) of their share (a move costs a cold cache; a looser
    bound for keeping than for placing gives re-planning hysteresis). Otherwise, among
    the instances it fits on, it goes to the one holding the fewest prefix tokens
    (`footprint`: locality is only worth something while an instance's classes fit in
    its cache together; SGLang's router likewise sends a new prefix to the smallest
    tree); if it fits nowhere, to the least filled. A lane is split over k instances
    only when its demand exceeds what one instance may hold; its k pieces go to k
    different instances, which then pull from the lane's one stream (so the split is
    balanced by pulling, not by weights).
    """
    inst = sorted(i for i, c in capacity.items() if c > 0)
    if not inst:
        return {}
    lanes = {lane: d for lane, d in demand.items() if d > 0}
    if not lanes:
        return {}
    top = max(lanes.values())  # work in units of the largest demand: no underflow
    lanes = {lane: d / top for lane, d in lanes.items()}
    fp = {lane: max(0.0, (footprint or {}).get(lane, 0.0)) for lane in lanes}
    total = sum(lanes.values())
    cap_total = sum(capacity[i] for i in inst)
    grow = 1 + slack
    hold = 1 + max(slack, keep_slack or 0.0)
    share = {i: total * capacity[i] / cap_total for i in inst}
    biggest = max(share.values()) * grow
    load = dict.fromkeys(inst, 0.0)
    held = dict.fromkeys(inst, 0.0)  # prefix tokens placed on each instance
    prev = {lane: [i for i in prev_owners if i in load]
            for lane, prev_owners in (previous or {}).items() if lane in lanes}
    # room that lanes not placed yet will want back on their previous owners: a displaced
    # lane is steered away from it, so one move does not push the next lane out too
    reserved = dict.fromkeys(inst, 0.0)
    for lane, owners_before in prev.items():
        for i in owners_before:
            reserved[i] += lanes[lane] / len(owners_before)
    out: dict[int, tuple[str, ...]] = {}
    for lane in sorted(lanes, key=lambda x: (-lanes[x], x)):
        d, f = lanes[lane], fp[lane]
        k = 1 if d <= biggest else min(len(inst), math.ceil(d / (total / len(inst) * grow)))
        piece = d / k
        for i in prev.get(lane, ()):
            reserved[i] -= d / len(prev[lane])
        chosen: list[str] = []
        for i in prev.get(lane, ()):
            if i not in chosen and len(chosen) < k and load[i] + piece <= share[i] * hold:
                chosen.append(i)
        while len(chosen) < k:
            rest = [i for i in inst if i not in chosen]
            fits = [i for i in rest if load[i] + reserved[i] + piece <= share[i] * grow]
            if fits:
                pick = min(fits, key=lambda i: (held[i], load[i] / share[i], i))
            else:
                pick = min(rest, key=lambda i: ((load[i] + reserved[i] + piece) / share[i], i))
            chosen.append(pick)
        for i in chosen:
            load[i] += piece
            held[i] += f
        out[lane] = tuple(sorted(chosen))
    return out


def lru_miss_ratios(
    rates: Sequence[float], sizes: Sequence[float], cache: float, one_off: float = 0.0
) -> list[float]:
    """Expected miss ratio of each prefix in an LRU cache of `cache` tokens (Che's
    approximation: an item stays cached for a characteristic time T, the time the cache
    takes to fill with other traffic; it misses iff it was not asked for within T).

    `rates[i]` requests/s ask for prefix i of `sizes[i]` tokens; `one_off` tokens/s are
    inserted once and never asked for again (the per-request suffixes), which crowd the
    cache too. All zeros when everything fits at once (no eviction pressure).
    """
    total = sum(sizes)
    if cache <= 0:
        return [1.0] * len(sizes)
    if total <= cache and one_off <= 0:
        return [0.0] * len(sizes)

    def occupied(t: float) -> float:
        return one_off * t + sum(s * -math.expm1(-r * t) for r, s in zip(rates, sizes, strict=True))

    lo, hi = 1e-6, 1e7
    if occupied(hi) <= cache:
        return [0.0] * len(sizes)
    for _ in range(40):  # bisection in log space: T spans milliseconds to days
        mid = math.sqrt(lo * hi)
        if occupied(mid) > cache:
            hi = mid
        else:
            lo = mid
    t = math.sqrt(lo * hi)
    return [math.exp(-r * t) for r in rates]


@dataclass(frozen=True)
class CacheModel:
    """What the planner knows about prefix caching, to price placements in work.

    `cache` is each instance's prefix-cache size in tokens (as its engine announces it);
    per lane: `rate` (requests/s), `prefix` (tokens a hit saves, the class's shared
    prefix) and `one_off` (tokens each request brings that nobody else shares); `weight`
    converts prefilled tokens into the demand's unit (decode-slot steps per token).
    """

    cache: Mapping[str, float]
    rate: Mapping[int, float]
    prefix: Mapping[int, float]
    one_off: Mapping[int, float]
    weight: float

    def work(
        self,
        demand: Mapping[int, float],
        owners: Mapping[int, Sequence[str]],
        live: Sequence[str],
    ) -> dict[str, float]:
        """Per live instance: its planned demand plus the prefill its expected prefix
        misses add, given which classes share its cache (a lane split over k owners
        sends each a k-th of its requests)."""
        pieces: dict[str, list[int]] = {i: [] for i in live}
        split: dict[int, int] = {}
        for lane, d in demand.items():
            if d <= 0:
                continue
            who = lane_owners(lane, owners, live)
            split[lane] = len(who)
            for i in who:
                pieces[i].append(lane)
        return {i: self._instance_work(i, lanes, demand, split) for i, lanes in pieces.items()}

    def _instance_work(
        self, inst: str, lanes: Sequence[int], demand: Mapping[int, float], split: Mapping[int, int]
    ) -> float:
        if not lanes:
            return 0.0
        rates = [self.rate.get(x, 0.0) / split[x] for x in lanes]
        sizes = [self.prefix.get(x, 0.0) for x in lanes]
        one_off = sum(r * self.one_off.get(x, 0.0) for r, x in zip(rates, lanes, strict=True))
        miss = lru_miss_ratios(rates, sizes, self.cache.get(inst, 0.0), one_off)
        base = sum(demand[x] / split[x] for x in lanes)
        return base + self.weight * sum(
            r * s * m for r, s, m in zip(rates, sizes, miss, strict=True)
        )


def place_for_cache(
    demand: Mapping[int, float],
    capacity: Mapping[str, float],
    model: CacheModel,
    previous: Mapping[int, Sequence[str]] | None = None,
    *,
    slack: float = 0.10,
    keep: float = 0.05,
) -> dict[int, tuple[str, ...]]:
    """Greedy placement priced by `CacheModel`: lanes largest demand first, each to the
    instance where the resulting largest per-capacity work is least (ties: where it
    adds least work, i.e. where its prefix competes least for the cache). A lane stays
    with its previous owner while that costs at most `keep` more (hysteresis: a move
    costs a cold cache). A lane bigger than one instance's share (1 + `slack`) is split
    into k pieces on k different instances, as `pack` does.
    """
    live = sorted(i for i, c in capacity.items() if c > 0)
    lanes = {lane: d for lane, d in demand.items() if d > 0}
    if not live or not lanes:
        return {}
    total = sum(lanes.values())
    cap_total = sum(capacity[i] for i in live)
    biggest = max(total * capacity[i] / cap_total for i in live) * (1 + slack)
    split = {
        lane: 1 if d <= biggest else min(len(live), math.ceil(d / (total / len(live) * (1 + slack))))
        for lane, d in lanes.items()
    }
    members: dict[str, list[int]] = {i: [] for i in live}
    work = dict.fromkeys(live, 0.0)
    out: dict[int, tuple[str, ...]] = {}
    for lane in sorted(lanes, key=lambda x: (-lanes[x], x)):
        chosen: list[str] = []
        for _ in range(split[lane]):
            options: list[tuple[float, float, str, float]] = []
            for j in live:
                if j in chosen:
                    continue
                w_j = model._instance_work(j, [*members[j], lane], lanes, split) / capacity[j]
                peak = max([w_j, *(work[i] for i in live if i != j)])
                options.append((peak, w_j - work[j], j, w_j))
            best = min(options)
            before = [o for o in options if o[2] in (previous or {}).get(lane, ())]
            if before and min(before)[0] <= best[0] * (1 + keep):
                best = min(before)
            chosen.append(best[2])
            members[best[2]].append(lane)
            work[best[2]] = best[3]
        out[lane] = tuple(sorted(chosen))
    return out


def refine_for_cache(
    demand: Mapping[int, float],
    capacity: Mapping[str, float],
    owners: Mapping[int, tuple[str, ...]],
    model: CacheModel,
    *,
    max_moves: int = 64,
    min_gain: float = 0.002,
) -> dict[int, tuple[str, ...]]:
    """Move whole classes off the instance with the most work, pricing cache misses.

    `pack` balances demand as if every prefix stayed cached. When an instance's classes
    do not fit its cache together, they evict each other and every miss stalls its batch
    for a full prefill: work that depends on *which* classes share an instance. Steepest
    descent on the sum of squared per-capacity work (`CacheModel.work`; squares rather
    than the maximum, so two instances tied at the top do not block every move): the
    best single move of a one-owner lane off the busiest instance that does not raise the
    maximum, while it lowers the sum by at least `min_gain` of it (every move costs the
    moved class a cold cache). Typically the hot classes end
    up together on instances whose cache holds them, and rarely used classes, which miss
    wherever they go, where their prefills hurt least.
    """
    live = sorted(i for i, c in capacity.items() if c > 0)
    out = dict(owners)
    if len(live) < 2:
        return out
    split = {lane: len(lane_owners(lane, out, live)) for lane in demand if demand[lane] > 0}
    members: dict[str, list[int]] = {i: [] for i in live}
    for lane in split:
        for i in lane_owners(lane, out, live):
            members[i].append(lane)

    def work_of(i: str, lanes: Sequence[int]) -> float:
        return model._instance_work(i, lanes, demand, split) / capacity[i]

    work = {i: work_of(i, members[i]) for i in live}
    for _ in range(max_moves):
        top = max(live, key=lambda i: (work[i], i))
        score = sum(v * v for v in work.values())
        best: tuple[float, int, str, float, float] | None = None
        for lane in members[top]:
            if split[lane] != 1:
                continue
            w_top = work_of(top, [x for x in members[top] if x != lane])
            for j in live:
                if j == top:
                    continue
                w_j = work_of(j, [*members[j], lane])
                if max(w_top, w_j) > work[top]:
                    continue  # never raise the maximum
                new = score - work[top] ** 2 - work[j] ** 2 + w_top**2 + w_j**2
                if best is None or new < best[0]:
                    best = (new, lane, j, w_top, w_j)
        if best is None or best[0] > score * (1 - min_gain):
            break
        _, lane, j, w_top, w_j = best
        members[top].remove(lane)
        members[j].append(lane)
        work[top], work[j] = w_top, w_j
        out[lane] = (j,)
    return out


def planned_load(
    demand: Mapping[int, float], owners: Mapping[int, Sequence[str]], live: Sequence[str]
) -> dict[str, float]:
    """Demand each live instance carries under `owners` (a lane's demand split evenly)."""
    load = dict.fromkeys(live, 0.0)
    for lane, d in demand.items():
        if d <= 0:
            continue
        who = lane_owners(lane, owners, live)
        for i in who:
            load[i] += d / len(who)
    return load


def imbalance(load: Mapping[str, float], capacity: Mapping[str, float] | None = None) -> float:
    """max over instances of load / fair share (1.0 = perfectly balanced; 0 if no load)."""
    if not load:
        return 0.0
    total = sum(load.values())
    if total <= 0:
        return 0.0
    caps = capacity or dict.fromkeys(load, 1.0)
    cap_total = sum(caps.get(i, 1.0) for i in load)
    return max(load[i] / (total * caps.get(i, 1.0) / cap_total) for i in load)


def _peak_and_spread(work: Mapping[str, float], capacity: Mapping[str, float]) -> tuple[float, float]:
    """Order of plans: lower largest per-capacity work, then lower sum of squares."""
    per = [work[i] / capacity[i] for i in work]
    return (max(per, default=0.0), sum(v * v for v in per))


class PromptAwarePlanner:
    """Online per-class statistics and the placement built from them.

    Feed it the cumulative per-lane counters of the shared statistics hash with
    `observe`: arrivals `L.arr` (counted by producers), and per finished call `L.n`,
    service seconds `L.sec`, prompt, output and cached tokens `L.in`, `L.out`, `L.hit`
    (counted by workers). It keeps exponentially decayed sums over one shared time base,
    so a class first seen a moment ago is not credited with the rate of its first burst,
    and means are weighted by calls, not by intervals. Rates forget fast (`half_life_s`:
    a class that stopped must stop counting); per-request costs forget slowly
    (`cost_half_life_s`: a class's output length changes rarely, and long outputs
    complete late, so their evidence is scarce).

    Demand of a lane is its rate times its cost per request, in decode-slot units:
    ``cost = output tokens + 1 + prefill_weight x (prompt tokens - best cached tokens)``.
    A request holds a batch slot for one step per output token; its uncached prompt
    stalls the batch for about `prefill_weight` steps per token (0.15 for the calibrated
    sim: 0.04 ms of prefill per token vs ~0.27 ms per sequence-step at batch 32). The
    uncached part is taken at the class's *best* observed hit, not its current one: while
    a class is still cold its misses would make it look ten times heavier than it is, so
    every cold start (and every move) would read as drift and trigger another move.
    Where every instance announces its prefix-cache size, the misses a placement causes
    are priced separately (`CacheModel`: Che's LRU approximation per instance, from the
    classes' rates and prefix sizes), since they depend on which classes share a cache;
    the plan is then the cheapest under that model of: the packed plan refined
    (`refine_for_cache`), a cache-priced greedy placement refined (`place_for_cache`),
    and every instance reading every lane (pull: right when all prefixes fit every
    cache, since locality is free then and only balance counts).

    `demand_model="seconds"` uses rate x measured service time (Little's law) instead,
    for engines that report no token counts; it is load-dependent (a busy instance's
    classes look heavier), which is why it is not the default.

    `maybe_replan` re-plans when the instances changed, when unplanned lanes carry
    noticeable demand, or when the current plan's max load / fair share drifted above
    1 + drift (at most once per `min_replan_s`); otherwise it keeps the plan, since
    every move costs the moved class a cold cache.

    Hysteresis against noise (opt-in: `drift_z` and `min_class_arrivals` are 0 by default).
    Measured on skew-K16 (3 + 3 repetitions), both rules on made some cold starts keep an
    early plan built on a few seconds of estimates: hit rate 0.58 instead of 0.95 for the
    first two steps, the staircase's first SLO missed, because that plan looked balanced
    enough (1.0-1.4x) to stay, while the plain 1.25 bound had re-planned it within seconds
    once the estimates firmed up. A re-plan trigger on "the estimates changed a lot since
    the plan" would be the principled fix; until then the rules below are for workloads
    whose re-plans at low rates cost more than a stale early plan. The rates are decayed
    Poisson counts, and at low load most
    classes show a handful of arrivals per half-life (skew-K64 at 20 req/s: most of its
    64 classes under 1 req/s): an instance's estimated load then wanders by tens of
    percent around its true load, crossing 1 + drift now and then with nothing changed,
    and each crossing moved classes (cold caches) to fit that sample's noise. Two rules
    keep the plan unless the evidence says otherwise:

    * drift counts only if an instance is over its bound by more than `drift_z` standard
      errors of its own estimated load (`load_noise`: the variance of a decayed Poisson
      count is the sum of its squared weights, tracked next to the counts, so a lane's
      rate has relative error 1 / sqrt(`evidence`)). A real shift (a class several
      times hotter) clears it at once; at high load the error, hence the margin, shrinks.
    * optionally (`min_class_arrivals` > 0), a new lane forces a re-plan only once its
      rate rests on that many effective arrivals (4: the rate known to about +-50 %);
      until then its default owner serves it. Off by default: in K16 cold starts the
      rarer classes then stayed unplanned for ~20 s in some runs, and the prefixes they
      brought to whichever instance served them cost the planned classes their cache hits
      (hit rate 0.6 instead of 0.95 for the first step).
    * the drift margin is capped at `drift` x the bound (`_drifted`): an instance at
      1.56x its share re-plans whatever the noise, since right after the first plans the
      estimates rest on a few arrivals and the uncapped margin kept a 1.9x plan.

    The margin is a trade: in an offline replay of skew-K64 (16 arrival seeds, 20 to 60
    req/s, the planner fed as in the runtime) the old trigger re-planned 3.1 / 1.6 /
    1.0 / 0.8 / 0.6 times per 8 s at 20 / 30 / 40 / 50 / 60 req/s; drift_z = 1.5 cut that
    to 0.8 / 0.4 / 0.3 / 0.1 / 0.2, while the planned imbalance under the true rates
    (excluding what the moves cost) went from 1.13 to 1.14-1.17 at 40-60 req/s (a plan
    made on low-rate evidence is kept longer); drift_z = 2 cut more and kept worse plans
    (1.16-1.22). A re-plan costs about 80 ms of planning on 64 classes, so testing
    "would a new plan be better" every interval instead is not free either. (Those replay
    figures predate the cap and had `min_class_arrivals` = 4; with the defaults now, the
    K16 cold start plans within ~4 s again and K64 re-plans somewhat more often.)
    """

    def __init__(self, options: SchedOptions | None = None) -> None:
        self.opts = options or SchedOptions()
        self.sums: dict[int, dict[str, float]] = {}  # per-request means (slow decay)
        self.counts: dict[int, dict[str, float]] = {}  # arrivals and calls (fast decay)
        # the same, each event's weight squared (decays twice as fast): the variance of a
        # decayed Poisson count, hence how much evidence a lane's rate rests on
        self.squares: dict[int, dict[str, float]] = {}
        self.best_hit: dict[int, float] = {}
        self.time_base = 0.0
        self._last: dict[str, float] | None = None
        self._last_t: float | None = None
        self._last_plan_t: float | None = None
        self._have_arrivals = False
        self.observations = 0

    def observe(self, counters: Mapping[str, float], now: float) -> None:
        if self._last is None or self._last_t is None:
            self._last, self._last_t = dict(counters), now
            return
        dt = now - self._last_t
        if dt <= 0:
            return
        fast = 0.5 ** (dt / self.opts.half_life_s)
        slow = 0.5 ** (dt / self.opts.cost_half_life_s)
        self.time_base = self.time_base * fast + dt
        for table, decay in ((self.counts, fast), (self.squares, fast * fast), (self.sums, slow)):
            for sums in table.values():
                for k in sums:
                    sums[k] *= decay
        for name, value in counters.items():
            lane_s, _, kind = name.partition(".")
            if not lane_s.isdigit():
                continue
            d = value - self._last.get(name, 0.0)
            lane = int(lane_s)
            if d:
                if kind in ("arr", "n"):
                    c = self.counts.setdefault(lane, {})
                    c[kind] = c.get(kind, 0.0) + d
                    q = self.squares.setdefault(lane, {})
                    q[kind] = q.get(kind, 0.0) + d  # new events weigh 1 (and 1 squared)
                if kind != "arr":
                    sums = self.sums.setdefault(lane, {})
                    sums[kind] = sums.get(kind, 0.0) + d
            if kind == "arr":
                self._have_arrivals = True
        for lane in self.sums:
            n_new = counters.get(f"{lane}.n", 0.0) - self._last.get(f"{lane}.n", 0.0)
            if n_new > 0:
                hit_new = counters.get(f"{lane}.hit", 0.0) - self._last.get(f"{lane}.hit", 0.0)
                self.best_hit[lane] = max(self.best_hit.get(lane, 0.0), hit_new / n_new)
        self._last, self._last_t = dict(counters), now
        self.observations += 1

    def _mean(self, lane: int, kind: str) -> float | None:
        sums = self.sums.get(lane, {})
        n = sums.get("n", 0.0)
        return sums.get(kind, 0.0) / n if n > 1e-9 else None

    def rate(self, lane: int) -> float:
        """Requests per second (arrivals if producers count them, else completions)."""
        if self.time_base <= 0:
            return 0.0
        c = self.counts.get(lane, {})
        return c.get("arr" if self._have_arrivals else "n", 0.0) / self.time_base

    def evidence(self, lane: int) -> float:
        """Effective number of events behind `rate(lane)` (Kish: (sum w)^2 / sum w^2 over
        the decayed events' weights). Arrivals are Poisson, so the decayed count's variance
        is the sum of the squared weights, and the rate's relative standard error is
        1 / sqrt(evidence): 1 for a class seen once, 0.5 for four arrivals."""
        kind = "arr" if self._have_arrivals else "n"
        c = self.counts.get(lane, {}).get(kind, 0.0)
        q = self.squares.get(lane, {}).get(kind, 0.0)
        return c * c / q if q > 1e-12 else 0.0

    def load_noise(
        self, demand: Mapping[int, float], owners: Mapping[int, Sequence[str]],
        live: Sequence[str],
    ) -> dict[str, float]:
        """Relative standard error of each instance's planned demand under `owners`.

        An instance's demand is a sum of its lanes' rate x cost; the rates' errors are
        independent (one Poisson process per class), so the variance is the sum of
        (lane demand share)^2 / evidence. Per-request costs decay slowly and are taken as
        known: at low rates the rates are the noisy part (a class seen twice in the last
        half-life). An instance with no demand gets 0."""
        mean = dict.fromkeys(live, 0.0)
        var = dict.fromkeys(live, 0.0)
        for lane, d in demand.items():
            if d <= 0:
                continue
            who = lane_owners(lane, owners, live)
            n = self.evidence(lane)
            for i in who:
                part = d / len(who)
                mean[i] += part
                var[i] += part * part / n if n > 0 else part * part
        return {i: math.sqrt(var[i]) / mean[i] if mean[i] > 0 else 0.0 for i in live}

    def cost(self, lane: int, *, misses_priced: bool = False) -> float | None:
        """Cost of one request of the lane (see the class docstring), None if unknown.

        `misses_priced`: a `CacheModel` adds the prefix misses per placement, so the cost
        counts only what a request prefills even on a hit (its own suffix)."""
        if self.opts.demand_model == "seconds":
            return self._mean(lane, "sec")
        out = self._mean(lane, "out")
        if out is None:
            return None
        prompt = self._mean(lane, "in") or 0.0
        best = self.best_hit.get(lane, 0.0)
        uncached = max(0.0, prompt - best)
        if misses_priced:
            uncached = uncached if best > 0 else 0.0
        return out + 1.0 + self.opts.prefill_weight * uncached

    def cache_model(self, cache: Mapping[str, float]) -> CacheModel:
        """Per-lane rate, prefix and one-off tokens for pricing misses (see `CacheModel`).
        A lane that never hit is taken to be all prefix: no evidence of a suffix yet."""
        prefix: dict[int, float] = {}
        one_off: dict[int, float] = {}
        for lane, prompt in self.footprint().items():
            best = min(self.best_hit.get(lane, 0.0), prompt)
            prefix[lane] = best if best > 0 else prompt
            one_off[lane] = prompt - best if best > 0 else 0.0
        return CacheModel(
            cache=dict(cache),
            rate={lane: self.rate(lane) for lane in set(self.sums) | set(self.counts)},
            prefix=prefix,
            one_off=one_off,
            weight=self.opts.prefill_weight,
        )

    def footprint(self) -> dict[int, float]:
        """Prompt tokens a lane's requests bring (its mean prompt length): an upper bound
        on the prefix it keeps cached wherever it runs."""
        out: dict[int, float] = {}
        for lane in self.sums:
            v = self._mean(lane, "in")
            if v is not None:
                out[lane] = v
        return out

    def demand(self, *, misses_priced: bool = False) -> dict[int, float]:
        costs = {lane: self.cost(lane, misses_priced=misses_priced)
                 for lane in set(self.sums) | set(self.counts)}
        known = [c for c in costs.values() if c is not None]
        fallback = sum(known) / len(known) if known else 1.0
        out: dict[int, float] = {}
        for lane, c in costs.items():
            r = self.rate(lane)
            if r > 1e-6:
                out[lane] = r * (c if c is not None else fallback)
        return out

    def class_stats(self) -> dict[int, dict[str, float]]:
        """Per-lane rate, cost, service time and token means (what /metrics can show)."""
        out: dict[int, dict[str, float]] = {}
        for lane in sorted(set(self.sums) | set(self.counts)):
            row: dict[str, float] = {"rate": self.rate(lane)}
            for name, kind in (("service_s", "sec"), ("prompt_tokens", "in"),
                               ("output_tokens", "out"), ("cached_tokens", "hit")):
                v = self._mean(lane, kind)
                if v is not None:
                    row[name] = v
            c = self.cost(lane)
            if c is not None:
                row["cost"] = c
            out[lane] = row
        return out

    def _drifted(
        self, work: Mapping[str, float], capacity: Mapping[str, float],
        noise: Mapping[str, float],
    ) -> bool:
        """Is some instance over (1 + drift) x its fair share by more than `drift_z`
        standard errors of its own estimated load? (drift_z = 0: the plain bound.)

        The margin is capped at `drift` x the bound, so an instance at (1 + drift)^2 of
        its share (1.56 by default) always counts: right after the first plans every
        estimate rests on a few arrivals, the uncapped margin was large, and a plan that
        put 1.9x the fair share on one instance was kept for 20 s in some K16 cold starts
        (prefix-hit rate 0.57 instead of 0.93, the first step's SLO missed)."""
        total = sum(work.values())
        if total <= 0:
            return False
        cap_total = sum(capacity.get(i, 1.0) for i in work)
        for i, w in work.items():
            bound = (1 + self.opts.drift) * total * capacity.get(i, 1.0) / cap_total
            margin = min(self.opts.drift_z * noise.get(i, 0.0) * w, self.opts.drift * bound)
            if w > bound + margin:
                return True
        return False

    def maybe_replan(
        self,
        capacity: Mapping[str, float],
        current: Placement | None,
        now: float,
        cache: Mapping[str, float] | None = None,
    ) -> Placement | None:
        """A new placement, or None to keep `current`.

        `cache`: each instance's prefix-cache size in tokens, where every live instance's
        engine announces one. Then loads are priced with a `CacheModel` (demand plus the
        prefill of expected misses, which depends on which classes share a cache) and
        the packed plan is refined for it (`refine_for_cache`); without it, demand alone.
        """
        live = sorted(i for i, c in capacity.items() if c > 0)
        if not live or self.observations < 1:
            return None
        priced = cache is not None and all((cache.get(i) or 0) > 0 for i in live)
        demand = self.demand(misses_priced=priced)
        if not demand:
            return None
        model = self.cache_model(cache) if priced and cache is not None else None

        def loads(owners: Mapping[int, Sequence[str]]) -> dict[str, float]:
            if model is not None:
                return model.work(demand, owners, live)
            return planned_load(demand, owners, live)
        cur = current or Placement()
        reason = ""
        if not cur.owners:
            reason = "first plan"
        elif set(cur.members) != set(live):
            reason = "instances changed"
        else:
            total = sum(demand.values())
            # a new class is planned once its cost is known (its first calls finished);
            # until then its default owner serves it, which costs no move
            # (and its rate rests on a few arrivals: a rare class seen once would otherwise
            # force a re-plan on the strength of one sample, and then again on the next)
            unplanned = sum(
                d for lane, d in demand.items()
                if lane not in cur.owners and self.cost(lane) is not None
                and self.evidence(lane) >= self.opts.min_class_arrivals
            )
            last = self._last_plan_t
            recent = last is not None and now - last < self.opts.min_replan_s
            if unplanned > self.opts.new_lane_share * total and not recent:
                reason = "new classes"
            elif not recent:
                work = loads(cur.owners)
                noise = (self.load_noise(demand, cur.owners, live)
                         if self.opts.drift_z > 0 else {})  # off by default: no margin
                if self._drifted(work, capacity, noise):
                    reason = f"drift {imbalance(work, capacity):.2f}"
        if not reason:
            return None
        # lanes never planned count as owned by their default (rendezvous) owner, which
        # has been serving them and holds their prefix
        previous = {lane: lane_owners(lane, cur.owners, live) for lane in demand}
        owners = pack(
            demand,
            {i: capacity[i] for i in live},
            previous,
            footprint=self.footprint(),
            slack=self.opts.slack,
            keep_slack=self.opts.drift * 0.6,
        )
        if model is not None:
            # two constructions, each refined, and "every instance reads every lane" (pull:
            # the best plan when all prefixes fit every cache, as then locality is free
            # and only balance counts); keep the one the model prices lowest
            caps = {i: capacity[i] for i in live}
            candidates = [
                refine_for_cache(demand, caps, plan, model)
                for plan in (owners, place_for_cache(demand, caps, model, previous,
                                                     slack=self.opts.slack))
            ]
            candidates.append({lane: tuple(live) for lane in demand})
            owners = min(candidates, key=lambda o: _peak_and_spread(model.work(demand, o, live),
                                                                      caps))
        self._last_plan_t = now
        if reason.startswith("drift"):
            # only worth the moves if it really is better (lumpy classes may not pack
            # any better, and re-planning to the same imbalance would only churn)
            before = imbalance(loads(cur.owners), capacity)
            after = imbalance(loads(owners), capacity)
            if after > before * 0.95:
                return None
        return Placement(
            epoch=cur.epoch + 1,
            owners=owners,
            planned=loads(owners),
            demand=demand,
            members=tuple(live),
            reason=reason,
        )


# ------------------------------------------------------------------------------------------
# stealing
# ------------------------------------------------------------------------------------------


def may_steal(policy: str, inflight: int, capacity: int, steal_below: float) -> bool:
    """May an instance take work from lanes it does not own?

    Always when it is idle (nothing in flight): no policy leaves capacity unused while
    work waits. prompt_aware also lets an instance with a free slot help (see
    `steal_sources` for where it may look); the SGLang-style baselines steal only when
    idle, as close to their original behaviour (no stealing) as the
    no-idle-while-work-waits rule allows.
    """
    if inflight <= 0:
        return True
    return policy == PROMPT_AWARE and inflight < capacity


def steal_sources(
    policy: str,
    inflight: int,
    capacity: int,
    others: Sequence[str],
    hot: Sequence[str],
    steal_below: float,
    warm: Sequence[str] = (),
) -> list[str]:
    """Lanes (streams) an instance whose own lanes are empty should look in now.

    `others` are all lanes it does not own; `warm` those it served lately whose owners
    are busier than it (their prefix is likely still in its cache: taking their work
    pools capacity at no miss); `hot` those whose owners are all full (work waits there
    for want of a free slot).

    * idle: everywhere, so no work waits while it could run it;
    * any free slot (prompt_aware): warm lanes;
    * under `steal_below` of its capacity: hot lanes too, although their class is cold
      here (a miss, and its prefix evicts some of this instance's own), since work is
      waiting and this instance is mostly idle.
    """
    if not may_steal(policy, inflight, capacity, steal_below):
        return []
    if inflight <= 0:
        return list(others)
    allowed = set(others)
    out = [x for x in warm if x in allowed]
    if inflight < steal_below * capacity:
        seen = set(out)
        out += [x for x in hot if x in allowed and x not in seen]
    return out


def busier_lanes(
    lanes: Sequence[int],
    owners: Mapping[int, Sequence[str]],
    live: Sequence[str],
    load: Mapping[str, float],
    mine: float,
    margin: float,
) -> list[int]:
    """Of `lanes`, those whose every live owner carries more than `mine + margin` (in
    flight, as last announced): taking their work moves it from busier to idler
    instances, never into a race with an owner that would have taken it at once."""
    return [
        j for j in lanes
        if all(load.get(o, 0.0) > mine + margin for o in lane_owners(j, owners, live))
    ]


def full_lanes(
    lanes: int, owners: Mapping[int, Sequence[str]], live: Sequence[str], full: set[str]
) -> list[int]:
    """Lanes whose live owners are all full (in flight >= capacity)."""
    return [j for j in range(lanes) if full.issuperset(lane_owners(j, owners, live))]
