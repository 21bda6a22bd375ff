"""Where a runner publishes each message and which streams it reads.

The default router keeps DESIGN.md's plain layout: one stream per stateless stage (its
instances pull, which is join-the-shortest-queue for free) and hashed partitions for
aggregating stages. Scheduling policies for LM stages (orchestrator/scheduling.py)
replace it to place work on per-instance streams; both sides of the decision —
publishing and consuming — go through this one object so they cannot disagree.

`PolicyRouter` is that replacement. A stateless LM stage whose policy is not `pull`
gets *lanes*: extra streams beside its base stream, read through the same consumer
group, so crash recovery (claiming abandoned entries) covers them like any stream.

* directed policies (round_robin, least_loaded, cache_aware): lane j belongs to the
  instance holding the lease on slot j; the producer picks an instance and publishes on
  its lane. Loads are the lanes' queue lengths (lag + pending) read at every refresh
  plus what this producer sent since.
* prompt_aware: lane = hash(prompt class) mod `lanes`; the producer only classifies.
  One instance of the stage (the holder of the planner lease) turns the shared per-lane
  statistics into a placement (lane -> instance slots) stored in the transport, where
  every instance reads which lanes are its own.

Placement state lives in the transport (slot leases, a members entry holding the plan,
a statistics hash), so it is the same for every producer process, works on both
transports and survives restarts. The base stream stays in every instance's read list:
end markers and messages from producers without a PolicyRouter still get served.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.envelope import Envelope
from orchestrator.routing import PREFIX, stage_group, stage_streams, stream_for
from orchestrator.scheduling import (
    CACHE_AWARE,
    DIRECTED,
    LEAST_LOADED,
    PROMPT_AWARE,
    PULL,
    CacheAwarePolicy,
    LeastLoadedPolicy,
    Placement,
    PrefixClassifier,
    PromptAwarePlanner,
    RoundRobinPolicy,
    SchedOptions,
    busier_lanes,
    effective_policy,
    full_lanes,
    lane_of,
    owned_lanes,
    parse_policy_override,
    slot_name,
    steal_sources,
)
from orchestrator.spec import PipelineSpec, StageSpec
from orchestrator.template import render
from orchestrator.transport import Delivery, Transport

if TYPE_CHECKING:
    from workers.runner import StageRunner

log = logging.getLogger("alto.router")

PLAN_MEMBER = "~plan"  # the placement is stored as this member of the stage's sched group


class Router:
    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    def stream_for(self, env: Envelope) -> str:
        """The stream to publish `env` on (called by the producing runner)."""
        return stream_for(self.spec, env)

    def all_streams(self, stage: str) -> list[str]:
        """Every stream the stage's consumer group must exist on."""
        return stage_streams(self.spec, stage)

    def consume_streams(self, runner: StageRunner) -> list[str]:
        """Streams this instance reads now, in order of preference."""
        return runner.owned

    async def consume(self, runner: StageRunner, count: int) -> list[Delivery]:
        """Read up to `count` new entries for `runner` (the runner's only read of new work).

        A hook rather than a fixed call because the transports rotate multi-stream reads
        for fairness: a policy that prefers some streams (its own lanes before stealing)
        must make separate reads, which only the router knows how to order.
        """
        return await runner.transport.consume(
            self.consume_streams(runner),
            runner.group,
            runner.instance,
            count,
            runner.config.block_ms,
        )

    async def refresh(self, runner: StageRunner) -> None:
        """Periodic hook (every heartbeat): pull placement/statistics from the transport."""

    def observe(self, event: str, data: dict[str, object]) -> None:
        """Statistics hook: the runner reports each finished call here too."""


# ------------------------------------------------------------------------------------------
# names in the transport
# ------------------------------------------------------------------------------------------


def base_stream(pipeline: str, stage: str) -> str:
    return f"{PREFIX}:{pipeline}:{stage}"


def lane_stream(pipeline: str, stage: str, lane: int) -> str:
    return f"{PREFIX}:{pipeline}:{stage}:q{lane}"


def sched_group(pipeline: str, stage: str) -> str:
    """Members group of a stage's scheduling state (instances with slots, and the plan)."""
    return f"{stage_group(pipeline, stage)}#sched"


def stats_key(pipeline: str, stage: str) -> str:
    """Shared counters: `L.arr|n|sec|in|out|hit` per lane, `sJ.*` per slot, `p.POLICY.*`."""
    return f"sched:{stage_group(pipeline, stage)}"


def lane_count(policy: str, options: SchedOptions) -> int:
    if policy == PROMPT_AWARE:
        return options.lanes
    if policy in DIRECTED:
        return options.slots
    return 0


def _rendered(stage: StageSpec, env: Envelope) -> str:
    """The prompt the stage will render for `env`, exactly as StageFunction renders it
    (the runner reports that string with each call, which is how a call finds its lane)."""
    values = dict(env.context)
    if env.payload is not None:
        values["text"] = env.payload
    return render(stage.prompt or "", values)


def _prompt_text(stage: StageSpec, env: Envelope) -> str:
    """What the engine sees (system prompt first): the text prefixes are matched on."""
    prompt = _rendered(stage, env)
    return f"{stage.system}\n\n{prompt}" if stage.system else prompt


# ------------------------------------------------------------------------------------------
# producer side: one per target stage
# ------------------------------------------------------------------------------------------


class _Target:
    """What a producer needs to place messages for one target stage."""

    def __init__(self, spec: PipelineSpec, stage: StageSpec, policy: str, opts: SchedOptions):
        self.spec = spec
        self.stage = stage
        self.policy = policy
        self.opts = opts
        self.base = base_stream(spec.name, stage.name)
        n = lane_count(policy, opts)
        self.lanes = [lane_stream(spec.name, stage.name, j) for j in range(n)]
        self.sched = sched_group(spec.name, stage.name)
        self.stats = stats_key(spec.name, stage.name)
        self.classifier = PrefixClassifier(
            chunk_chars=opts.chunk_chars,
            min_count=opts.min_count,
            max_chunks=opts.max_chunks,
            max_nodes=opts.classifier_nodes,
        )
        self.root = hashlib.blake2b((stage.prompt or "").encode(), digest_size=16).digest()
        self.arrivals: dict[int, int] = {}
        self.slots: dict[str, int] = {}  # live slot name -> lane index
        self.observed: dict[str, float] = {}  # queue length per slot at the last refresh
        self.sent: dict[str, int] = {}  # messages this producer placed since then
        self.rr = RoundRobinPolicy()
        self.ll = LeastLoadedPolicy()
        self.ca = CacheAwarePolicy(
            cache_threshold=opts.cache_threshold,
            balance_abs_threshold=opts.balance_abs_threshold,
            balance_rel_threshold=opts.balance_rel_threshold,
            max_tree_chars=opts.max_tree_chars,
            eviction_interval_s=opts.eviction_interval_s,
        )
        self.routed = 0

    def loads(self) -> dict[str, float]:
        return {s: self.observed.get(s, 0.0) + self.sent.get(s, 0) for s in self.slots}

    def route(self, env: Envelope) -> str:
        self.routed += 1
        if self.policy == PROMPT_AWARE:
            cls = self.classifier.classify(_prompt_text(self.stage, env), self.root)
            lane = lane_of(cls, len(self.lanes))
            self.arrivals[lane] = self.arrivals.get(lane, 0) + 1
            return self.lanes[lane]
        if not self.slots:  # no instance known yet: any instance will pull it from the base
            return self.base
        if self.policy == LEAST_LOADED:
            pick = self.ll.choose(self.loads())
        elif self.policy == CACHE_AWARE:
            pick = self.ca.choose(_prompt_text(self.stage, env), self.loads())
        else:
            pick = self.rr.choose(list(self.slots))
        self.sent[pick] = self.sent.get(pick, 0) + 1
        return self.lanes[self.slots[pick]]

    async def refresh(self, transport: Transport, now: float) -> None:
        if self.policy == PROMPT_AWARE:
            if self.arrivals:
                counts, self.arrivals = self.arrivals, {}
                await transport.hincr(self.stats, {f"{k}.arr": v for k, v in counts.items()})
            return
        members = await transport.members(self.sched)
        slots: dict[str, int] = {}
        for name, info in members.items():
            j = info.get("slot") if name != PLAN_MEMBER else None
            if isinstance(j, int) and 0 <= j < len(self.lanes):
                slots[slot_name(j)] = j
        observed: dict[str, float] = {}
        group = stage_group(self.spec.name, self.stage.name)
        for s, j in slots.items():
            try:
                st = await transport.stats(self.lanes[j], group)
                observed[s] = float(st.lag + st.pending)
            except LookupError:  # no consumer group yet: all of the lane waits
                observed[s] = float(await transport.length(self.lanes[j]))
        self.slots, self.observed, self.sent = slots, observed, {}
        if self.policy == CACHE_AWARE:
            self.ca.forget(slots)
            self.ca.maybe_evict(now)


# ------------------------------------------------------------------------------------------
# consumer side: the instance's own stage
# ------------------------------------------------------------------------------------------


@dataclass
class _Own:
    """Scheduling state of one instance of a policy-placed stage."""

    policy: str
    base: str
    lanes: list[str]
    lane_index: dict[str, int]
    stats: str
    sched: str
    slot: int | None = None
    primary: list[str] = field(default_factory=list)
    victims: list[str] = field(default_factory=list)  # every lane not its own
    hot: list[str] = field(default_factory=list)  # lanes whose owners are all full
    placement: Placement | None = None
    planner: PromptAwarePlanner | None = None
    leader: bool = False
    plan_written: float = 0.0
    live: list[str] = field(default_factory=list)
    # prompt -> lanes of the deliveries carrying it (equal prompts may be in flight twice)
    lane_of_prompt: OrderedDict[str, list[int]] = field(default_factory=OrderedDict)
    served: dict[int, float] = field(default_factory=dict)  # lane -> last delivery here
    # lanes that ever carried traffic; the others are only swept once per refresh, so an
    # instance does not poll a hundred empty streams on every read (on Redis, each empty
    # stream in a read costs an XREADGROUP and an XREVRANGE)
    active: set[int] = field(default_factory=set)
    dormant: list[str] = field(default_factory=list)  # own lanes without traffic yet
    cold: list[str] = field(default_factory=list)  # other lanes without traffic yet
    sweep: bool = False  # read the dormant/cold lanes once (set at every refresh)
    loads: dict[str, float] = field(default_factory=dict)  # slot -> in flight (heartbeats)
    pending: dict[str, float] = field(default_factory=dict)  # counters not yet flushed
    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    stolen: int = 0
    replans: int = 0


_ROUTERS: weakref.WeakSet[PolicyRouter] = weakref.WeakSet()


class PolicyRouter(Router):
    """Router for pipelines where some LM stage has a scheduling policy.

    One is made per runner (its own stage: consumer side) and may be made with
    `stage=None` for a process that only starts runs (the gateway: producer for the
    entry stage). Stages left on `pull` behave exactly as with `Router`.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        stage: str | None,
        *,
        override: dict[str, str] | None = None,
        options: SchedOptions | None = None,
    ):
        super().__init__(spec)
        self.opts = options or SchedOptions()
        self.override = dict(override or {})
        self.stage_name = stage
        self.policies = {
            s.name: effective_policy(s.kind, s.aggregates, s.policy, s.name, self.override)
            for s in spec.stages
        }
        targets = spec.stage(stage).to if stage is not None else [spec.entry_stage]
        self.targets = {
            t: _Target(spec, spec.stage(t), self.policies[t], self.opts)
            for t in targets
            if self.policies[t] != PULL
        }
        self.own: _Own | None = None
        if stage is not None and self.policies[stage] != PULL:
            lanes = [
                lane_stream(spec.name, stage, j)
                for j in range(lane_count(self.policies[stage], self.opts))
            ]
            self.own = _Own(
                policy=self.policies[stage],
                base=base_stream(spec.name, stage),
                lanes=lanes,
                lane_index={s: j for j, s in enumerate(lanes)},
                stats=stats_key(spec.name, stage),
                sched=sched_group(spec.name, stage),
            )
            if self.own.policy == PROMPT_AWARE:
                self.own.planner = PromptAwarePlanner(self.opts)
        self._runner: weakref.ReferenceType[StageRunner] | None = None
        _ROUTERS.add(self)

    @property
    def policy(self) -> str:
        return self.policies[self.stage_name] if self.stage_name is not None else PULL

    # ---- publishing -------------------------------------------------------------------
    def stream_for(self, env: Envelope) -> str:
        target = self.targets.get(env.stage)
        if target is None or env.kind != "unit":
            return super().stream_for(env)
        return target.route(env)

    async def refresh_targets(self, transport: Transport) -> None:
        """Producer-side refresh (live instances, queue lengths, arrival counts); a process
        that only starts runs calls this itself, a runner gets it through `refresh`."""
        now = time.monotonic()
        for target in self.targets.values():
            await target.refresh(transport, now)

    # ---- consuming --------------------------------------------------------------------
    def all_streams(self, stage: str) -> list[str]:
        streams = super().all_streams(stage)
        if self.own is not None and stage == self.stage_name:
            return [*streams, *self.own.lanes]
        return streams

    def consume_streams(self, runner: StageRunner) -> list[str]:
        if self.own is None or not self.own.primary:
            return runner.owned
        return self.own.primary

    async def consume(self, runner: StageRunner, count: int) -> list[Delivery]:
        own = self.own
        if own is None or not own.primary:
            return await super().consume(runner, count)
        t, group, me = runner.transport, runner.group, runner.instance
        sweep, own.sweep = own.sweep, False
        first = own.primary + own.dormant if sweep else own.primary
        got = await t.consume(first, group, me, count, 0)
        if not got:
            victims = steal_sources(
                own.policy, runner.inflight, runner.capacity,
                own.victims + own.cold if sweep else own.victims, own.hot,
                self.opts.steal_below, self._warm(runner),
            )
            if victims:
                got = await t.consume(
                    list(victims), group, me, min(count, self.opts.steal_batch), 0
                )
                own.stolen += len(got)
            if not got:
                wait = runner.config.block_ms
                if victims:  # come back soon: those lanes may back up meanwhile
                    wait = min(wait, self.opts.steal_poll_ms)
                got = await t.consume(own.primary, group, me, count, wait)
        if own.policy == PROMPT_AWARE:
            self._remember_lanes(got)
        return got

    def _warm(self, runner: StageRunner) -> list[str]:
        """Lanes this instance served within `warm_s` (their prefixes are likely cached)
        whose owners are all busier than it (so taking their work pools capacity instead
        of racing an owner that has room)."""
        own = self.own
        if own is None or own.policy != PROMPT_AWARE:
            return []
        cutoff = time.monotonic() - self.opts.warm_s
        for lane in [x for x, t in own.served.items() if t < cutoff]:
            del own.served[lane]
        owners = own.placement.owners if own.placement is not None else {}
        margin = max(1.0, runner.capacity / 8)
        busy = busier_lanes(list(own.served), owners, own.live, own.loads, runner.inflight,
                            margin)
        return [own.lanes[x] for x in busy]

    def _remember_lanes(self, got: list[Delivery]) -> None:
        """Note each prompt's lane, so the call's statistics land on its class."""
        own = self.own
        assert own is not None and self.stage_name is not None
        stage = self.spec.stage(self.stage_name)
        now = time.monotonic()
        for d in got:
            lane = own.lane_index.get(d.stream)
            if lane is None or d.envelope.kind != "unit":
                continue
            own.served[lane] = now
            own.lane_of_prompt.setdefault(_rendered(stage, d.envelope), []).append(lane)
            while len(own.lane_of_prompt) > 10_000:
                own.lane_of_prompt.popitem(last=False)

    def observe(self, event: str, data: dict[str, object]) -> None:
        own = self.own
        if own is None or event != "call" or data.get("stage") != self.stage_name:
            return
        secs = _num(data.get("seconds"))
        p_tok = _num(data.get("prompt_tokens"))
        out_tok = _num(data.get("completion_tokens"))
        hit = _num(data.get("cached_tokens"))
        own.calls += 1
        own.prompt_tokens += int(p_tok)
        own.cached_tokens += int(hit)
        own.seconds += secs
        add = own.pending
        prompt = data.get("prompt")
        lane = None
        if isinstance(prompt, str) and prompt in own.lane_of_prompt:
            lanes = own.lane_of_prompt[prompt]
            lane = lanes.pop(0)
            if not lanes:
                del own.lane_of_prompt[prompt]
        if lane is not None:
            for k, v in (("n", 1.0), ("sec", secs), ("in", p_tok), ("out", out_tok), ("hit", hit)):
                add[f"{lane}.{k}"] = add.get(f"{lane}.{k}", 0.0) + v
        if own.slot is not None:
            s = slot_name(own.slot)
            for k, v in (("calls", 1.0), ("prompt", p_tok), ("cached", hit)):
                add[f"{s}.{k}"] = add.get(f"{s}.{k}", 0.0) + v
        for k, v in (("calls", 1.0), ("prompt", p_tok), ("cached", hit)):
            key = f"p.{own.policy}.{k}"
            add[key] = add.get(key, 0.0) + v

    async def refresh(self, runner: StageRunner) -> None:
        self._runner = weakref.ref(runner)
        try:
            if self.own is not None:
                await self._refresh_own(runner)
            await self.refresh_targets(runner.transport)
        except Exception:  # noqa: BLE001 - a scheduling hiccup must never stop a runner
            log.warning("scheduling refresh failed for %s", runner.instance, exc_info=True)

    async def _refresh_own(self, runner: StageRunner) -> None:
        own = self.own
        assert own is not None
        t, me = runner.transport, runner.instance
        group = runner.group
        ttl = max(runner.config.lease_ttl_ms, 3 * runner.config.heartbeat_ms)
        now = time.monotonic()
        # 1. an instance slot (its identity in plans and its lane for directed policies)
        if own.slot is not None and not await t.acquire_lease(
            f"{group}#slot{own.slot}", me, ttl
        ):
            own.slot = None
        if own.slot is None:
            for j in range(self.opts.slots):
                if await t.acquire_lease(f"{group}#slot{j}", me, ttl):
                    own.slot = j
                    break
        # 2. statistics gathered since the last refresh
        if own.pending:
            pending, own.pending = own.pending, {}
            await t.hincr(own.stats, pending)
        # 3. announce this instance to producers and the planner
        engine = getattr(runner.function, "engine", None)
        load_fn = getattr(engine, "load", None)
        info: dict[str, Any] = {
            "slot": own.slot,
            "policy": own.policy,
            "inflight": runner.inflight,
            "capacity": runner.capacity,
            "engine_load": load_fn() if callable(load_fn) else None,
            "cache_tokens": _cache_tokens(engine),
            "stolen": own.stolen,
            "calls": own.calls,
        }
        await t.heartbeat(own.sched, me, info, runner.config.heartbeat_ms * 5)
        members = await t.members(own.sched)
        capacity: dict[str, float] = {}
        cache: dict[str, float] = {}
        full: set[str] = set()
        own.loads = {}
        for name, m in members.items():
            j = m.get("slot") if name != PLAN_MEMBER else None
            if isinstance(j, int):
                capacity[slot_name(j)] = float(m.get("capacity") or 1)
                cache[slot_name(j)] = float(m.get("cache_tokens") or 0)
                own.loads[slot_name(j)] = float(m.get("inflight") or 0)
                if int(m.get("inflight") or 0) >= int(m.get("capacity") or 1):
                    full.add(slot_name(j))
        own.live = sorted(capacity)
        plan_info = members.get(PLAN_MEMBER)
        if plan_info:
            stored = Placement.from_json(plan_info)
            if own.placement is None or stored.epoch >= own.placement.epoch:
                own.placement = stored
        # 4. prompt_aware: the planner (one per stage, by lease) re-plans when needed
        if own.policy == PROMPT_AWARE and own.planner is not None:
            counters = await t.hgetall(own.stats)
            own.active = {
                int(k.partition(".")[0]) for k, v in counters.items()
                if v > 0 and k[0].isdigit() and k.endswith((".arr", ".n"))
            }
            own.leader = own.slot is not None and await t.acquire_lease(
                f"{group}#planner", me, ttl
            )
            if own.leader:
                own.planner.observe(counters, now)
                new = own.planner.maybe_replan(capacity, own.placement, now, cache)
                if new is not None:
                    own.placement = new
                    own.replans += 1
                    log.info("%s: placement %d (%s)", group, new.epoch, new.reason)
                if own.placement is not None and (
                    new is not None or now - own.plan_written > 60.0
                ):
                    await t.heartbeat(
                        own.sched, PLAN_MEMBER, own.placement.to_json(), self.opts.plan_ttl_ms
                    )
                    own.plan_written = now
        # 5. what to read: own lanes (and the base stream) first, the rest only to steal
        if own.policy == PROMPT_AWARE:
            mine: list[int] = []
            owners = own.placement.owners if own.placement is not None else {}
            if own.slot is not None:
                mine = owned_lanes(slot_name(own.slot), owners, own.live, len(own.lanes))
            chosen = set(mine)
            live_lanes = own.active
            own.primary = [own.lanes[j] for j in mine if j in live_lanes] + [own.base]
            own.dormant = [own.lanes[j] for j in mine if j not in live_lanes]
            own.victims = [s for j, s in enumerate(own.lanes)
                           if j not in chosen and j in live_lanes]
            own.cold = [s for j, s in enumerate(own.lanes)
                        if j not in chosen and j not in live_lanes]
            own.sweep = True
            own.hot = [
                own.lanes[j] for j in full_lanes(len(own.lanes), owners, own.live, full)
                if j not in chosen
            ]
        else:
            if own.slot is not None:
                own.primary = [own.lanes[own.slot], own.base]
            else:
                own.primary = [own.base]
            own.victims = [s for j, s in enumerate(own.lanes) if j != own.slot]
            own.hot = [own.lanes[j] for j in range(len(own.lanes))
                       if j != own.slot and slot_name(j) in full]

    # ---- metrics ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any] | None:
        """This instance's scheduling numbers (None for a router with no own stage)."""
        own = self.own
        if own is None:
            return None
        runner = self._runner() if self._runner is not None else None
        engine = getattr(getattr(runner, "function", None), "engine", None)
        load_fn = getattr(engine, "load", None)
        return {
            "instance": getattr(runner, "instance", None),
            "slot": slot_name(own.slot) if own.slot is not None else None,
            "policy": own.policy,
            "inflight": getattr(runner, "inflight", 0),
            "capacity": getattr(runner, "capacity", None),
            "engine_load": load_fn() if callable(load_fn) else None,
            "calls": own.calls,
            "prompt_tokens": own.prompt_tokens,
            "cached_tokens": own.cached_tokens,
            "prefix_hit_rate": _rate(own.cached_tokens, own.prompt_tokens),
            "stolen": own.stolen,
            "own_lanes": max(0, len(own.primary) - 1) + len(own.dormant),
            "planner": own.leader,
            "replans": own.replans,
            "placement_epoch": own.placement.epoch if own.placement is not None else None,
        }


def _cache_tokens(engine: object) -> int | None:
    """Prefix-cache size of an engine in tokens, where it says (the sim's `cache`; any
    engine may expose `cache_tokens`): the planner prices cache misses with it."""
    n = getattr(engine, "cache_tokens", None)
    if isinstance(n, int | float) and n > 0:
        return int(n)
    cache = getattr(engine, "cache", None)
    blocks, size = getattr(cache, "capacity_blocks", None), getattr(cache, "block_size", None)
    if isinstance(blocks, int) and isinstance(size, int) and blocks > 0:
        return blocks * size
    return None


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _max_over_mean(values: list[float]) -> float | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else None


# ------------------------------------------------------------------------------------------
# wiring and metrics
# ------------------------------------------------------------------------------------------


def needs_policy_router(spec: PipelineSpec, override: dict[str, str]) -> bool:
    return any(
        effective_policy(s.kind, s.aggregates, s.policy, s.name, override) != PULL
        for s in spec.stages
    )


def policy_router_factory(
    policy: str | None = None, options: SchedOptions | None = None
) -> Callable[[PipelineSpec, str], Router]:
    """The Runtime's `router_factory`: a PolicyRouter where some stage has a policy (from
    the spec, or `policy`, the ALTO_POLICY syntax), else the plain Router."""
    override = parse_policy_override(policy)

    def make(spec: PipelineSpec, stage: str) -> Router:
        if needs_policy_router(spec, override):
            return PolicyRouter(spec, stage, override=override, options=options)
        return Router(spec)

    return make


def entry_router(
    spec: PipelineSpec, policy: str | None = None, options: SchedOptions | None = None
) -> Router:
    """The router a process that starts runs (the gateway) publishes entry messages with;
    it must call `refresh_targets(transport)` now and then (e.g. every 100 ms)."""
    override = parse_policy_override(policy)
    if needs_policy_router(spec, override):
        return PolicyRouter(spec, None, override=override, options=options)
    return Router(spec)


def router_metrics() -> dict[str, Any]:
    """Per-policy prefix-hit rate and per-instance load of the stages run in this process.

    Shape: {"stages": {"<pipeline>.<stage>": {"policy", "calls", "prompt_tokens",
    "cached_tokens", "prefix_hit_rate", "load_imbalance" (max/mean of in-flight),
    "instances": {instance: snapshot}}}, "policies": {policy: {"calls", "prompt_tokens",
    "cached_tokens", "prefix_hit_rate"}}}. Only PolicyRouters report (stages on `pull`
    with the plain Router have no scheduling state); see `cluster_router_metrics` for
    the numbers of all processes, read from the transport.
    """
    stages: dict[str, dict[str, Any]] = {}
    policies: dict[str, dict[str, Any]] = {}
    for r in list(_ROUTERS):
        snap = r.snapshot()
        if snap is None or r.stage_name is None:
            continue
        key = stage_group(r.spec.name, r.stage_name)
        st = stages.setdefault(
            key,
            {"policy": snap["policy"], "calls": 0, "prompt_tokens": 0, "cached_tokens": 0,
             "instances": {}},
        )
        st["calls"] += snap["calls"]
        st["prompt_tokens"] += snap["prompt_tokens"]
        st["cached_tokens"] += snap["cached_tokens"]
        st["instances"][snap["instance"] or f"router-{id(r)}"] = snap
        pol = policies.setdefault(
            snap["policy"], {"calls": 0, "prompt_tokens": 0, "cached_tokens": 0}
        )
        pol["calls"] += snap["calls"]
        pol["prompt_tokens"] += snap["prompt_tokens"]
        pol["cached_tokens"] += snap["cached_tokens"]
    for st in stages.values():
        st["prefix_hit_rate"] = _rate(st["cached_tokens"], st["prompt_tokens"])
        st["load_imbalance"] = _max_over_mean(
            [float(i["inflight"]) for i in st["instances"].values()]
        )
    for pol in policies.values():
        pol["prefix_hit_rate"] = _rate(pol["cached_tokens"], pol["prompt_tokens"])
    return {"stages": stages, "policies": policies}


async def cluster_router_metrics(
    transport: Transport, spec: PipelineSpec, policy: str | None = None
) -> dict[str, Any]:
    """The same numbers for every process, from the transport (what a gateway that runs
    no stages reports): per stage with a policy, the policy's prefix-hit rate (counted
    since the statistics hash was created), per live instance its slot, in-flight,
    capacity, engine load and hit rate, the load imbalance, and the stored placement.

    A stateless LM stage that is on `pull` here is still reported when its workers placed
    work under a policy: they may run with an ALTO_POLICY this process was not given, and
    what they wrote to the transport (their heartbeats say which policy) is the truth."""
    override = parse_policy_override(policy)
    out: dict[str, Any] = {}
    for s in spec.stages:
        if s.kind != "lm" or s.aggregates:
            continue
        pol = effective_policy(s.kind, s.aggregates, s.policy, s.name, override)
        counters = await transport.hgetall(stats_key(spec.name, s.name))
        members = await transport.members(sched_group(spec.name, s.name))
        if pol == PULL:
            announced = [str(m["policy"]) for n, m in members.items()
                         if n != PLAN_MEMBER and m.get("policy")]
            if not announced:
                continue
            pol = announced[0]
        instances: dict[str, Any] = {}
        for name, info in members.items():
            if name == PLAN_MEMBER:
                continue
            j = info.get("slot")
            slot = slot_name(j) if isinstance(j, int) else None
            prompt = counters.get(f"{slot}.prompt", 0.0) if slot else 0.0
            cached = counters.get(f"{slot}.cached", 0.0) if slot else 0.0
            instances[name] = {
                **info,
                "prefix_hit_rate": _rate(cached, prompt),
            }
        policies: dict[str, Any] = {}
        for name, value in counters.items():
            if name.startswith("p."):
                _, pname, field_name = name.split(".", 2)
                policies.setdefault(pname, {})[field_name] = value
        for numbers in policies.values():
            numbers["prefix_hit_rate"] = _rate(numbers.get("cached", 0.0),
                                               numbers.get("prompt", 0.0))
        plan = members.get(PLAN_MEMBER)
        out[stage_group(spec.name, s.name)] = {
            "stage": s.name,
            "policy": pol,
            "policies": policies,
            "instances": instances,
            "load_imbalance": _max_over_mean(
                [float(i.get("inflight") or 0) for i in instances.values()]
            ),
            "placement": plan,
        }
    return out
