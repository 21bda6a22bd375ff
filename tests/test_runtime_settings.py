"""`Runtime.embedded`: the in-process runtime of `alto serve` and `alto run`, built from
the ALTO_* settings by one builder so the two commands cannot drift apart."""

from __future__ import annotations

from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from workers.client import run_to_completion
from workers.runtime import Runtime
from workers.settings import Settings


async def test_the_embedded_runtime_follows_the_settings(transport: Transport) -> None:
    """`alto run` and `alto serve` build their in-process runtime with Runtime.embedded, so
    ALTO_INSTANCES, ALTO_CONCURRENCY and the runner settings reach both (alto run used to
    ignore them all)."""
    spec = parse_pipeline({"name": "emb", "stages": [
        {"name": "ask", "kind": "lm", "prompt": "{input}", "to": ["up"]},
        {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper"}]})
    settings = Settings(instances=3, concurrency=5, claim_idle_ms=1234, max_deliveries=7)
    rt = Runtime.embedded(transport, [spec], settings)
    await rt.start()
    try:
        by_stage = {s: [r for r in rt.runners if r.stage.name == s] for s in ("ask", "up")}
        run, events = await run_to_completion(transport, spec, "hi", deadline_s=30)
    finally:
        await rt.stop()
    assert len(by_stage["ask"]) == 3 and len(by_stage["up"]) == 1
    assert all(r.capacity == 5 for r in rt.runners)
    assert all(r.config.claim_idle_ms == 1234 and r.config.max_deliveries == 7
               for r in rt.runners)
    assert events[-1]["type"] == "result"
