"""An `openai` engine in front of a fleet: `base_url` lists the servers and instance i talks
to the i-th, so each instance's prompts meet one server's prefix cache (a fleet behind one
load-balanced URL would scatter them, and prompt-aware placement would place nothing).
The spec gives such an engine one instance per server; `alto worker` runs them all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.cli import _default_instances
from orchestrator.spec import EngineSpec, parse_pipeline
from orchestrator.transport import Transport
from tests import fixtures_llama
from tests.fixtures_llama import ScriptedSSEServer, chat_chunk, start_scripted
from workers.client import run_to_completion
from workers.engines import build_engine, default_instances, fleet
from workers.engines.openai_compat import BASE_URL_ENV, OpenAIEngine, split_urls
from workers.runner import RunnerConfig
from workers.runtime import Runtime

scripted_server = fixtures_llama.scripted_server  # a fixture of tests/fixtures_llama.py

FLEET = ["http://gpu-0:8000", "http://gpu-1:8000/v1", "http://gpu-2:8000"]


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        ("http://a", ["http://a"]),
        ("http://a, http://b,", ["http://a", "http://b"]),
        (["http://a", " http://b "], ["http://a", "http://b"]),
        ("", []),
        (None, []),
        (3, []),
        (["http://a", 3], []),
    ],
)
def test_split_urls(value: Any, urls: list[str]) -> None:
    assert split_urls(value) == urls


def test_a_list_of_servers_gives_one_instance_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    assert default_instances(EngineSpec(kind="openai", base_url=FLEET)) == 3
    assert default_instances(EngineSpec(kind="openai", base_url="http://a,http://b")) == 2
    assert default_instances(EngineSpec(kind="openai", base_url="http://a")) == 1
    said = EngineSpec(kind="openai", base_url=FLEET, instances=6)
    assert default_instances(said) == 6  # said so
    sim = EngineSpec(kind="sim", base_url=FLEET)
    assert default_instances(sim) == 1  # only openai has servers
    with pytest.raises(ValueError, match="at most 256"):
        default_instances(EngineSpec(kind="openai", base_url=[f"http://h{i}" for i in range(257)]))


def test_instance_i_talks_to_server_i(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = EngineSpec(kind="openai", base_url=FLEET, instances=4)
    roots = []
    for i in range(spec.instances):
        engine = build_engine(spec, i)
        assert isinstance(engine, OpenAIEngine)
        roots.append(engine.root)
    assert roots == ["http://gpu-0:8000/v1", "http://gpu-1:8000/v1", "http://gpu-2:8000/v1",
                     "http://gpu-0:8000/v1"]  # modulo the number of servers
    monkeypatch.setenv(BASE_URL_ENV, "http://e0,http://e1")  # the environment's list too
    engine = build_engine(EngineSpec(kind="openai", instances=2), 1)
    assert isinstance(engine, OpenAIEngine) and engine.root == "http://e1/v1"


@pytest.mark.parametrize("bad", [["http://a", 3], {"url": "http://a"}, 7])
def test_a_malformed_server_list_is_named_at_build_time(bad: Any) -> None:
    with pytest.raises(ValueError, match="'base_url' must be a URL or a list of URLs"):
        build_engine(EngineSpec(kind="openai", base_url=bad))


def test_alto_worker_runs_one_instance_per_listed_server() -> None:
    def spec(engine: dict[str, Any], kind: str = "lm") -> Any:
        stage = ({"name": "gen", "kind": "lm", "prompt": "{text}"} if kind == "lm" else
                 {"name": "gen", "kind": "tool", "function": "tests.toy.stages:upper"})
        return parse_pipeline({"name": "p", "engines": {"default": engine}, "stages": [stage]})

    assert _default_instances(spec({"kind": "openai", "base_url": FLEET}), "gen", None) == 3
    assert _default_instances(spec({"kind": "openai", "base_url": "http://a"}), "gen", None) == 1
    # a GPU engine fills its pod: one instance per worker whatever the spec says
    assert _default_instances(spec({"kind": "sim", "instances": 4}), "gen", None) == 1
    assert _default_instances(spec({"kind": "sim"}, "tool"), "gen", None) == 1
    override = EngineSpec(kind="openai", base_url=FLEET[:2])
    assert _default_instances(spec({"kind": "sim"}), "gen", override) == 2


def test_a_fleet_from_the_environment_gets_one_instance_per_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spec cannot see ALTO_OPENAI_BASE_URL (it is validated without the environment);
    the runtime and `alto worker` count its servers when the spec names none."""
    monkeypatch.setenv(BASE_URL_ENV, "http://e0, http://e1,http://e2")
    spec = parse_pipeline({"name": "p", "engines": {"default": {"kind": "openai"}},
                           "stages": [{"name": "gen", "kind": "lm", "prompt": "{text}"}]})
    espec = spec.engines["default"]
    assert espec.instances == 1 and fleet(espec) == ["http://e0", "http://e1", "http://e2"]
    assert default_instances(espec) == 3
    assert _default_instances(spec, "gen", None) == 3
    said = EngineSpec(kind="openai", instances=2)
    assert default_instances(said) == 2  # the spec's own count wins
    monkeypatch.setenv(BASE_URL_ENV, "http://one")
    assert default_instances(espec) == 1 and _default_instances(spec, "gen", None) == 1


async def test_a_pipeline_over_two_servers_uses_both(
    transport: Transport, scripted_server: list[ScriptedSSEServer]
) -> None:
    """Real runs through the embedded runtime: each of the stage's two runners has the
    engine of its own server, and every call reaches one of the two."""
    stream = [chat_chunk("ok", finish="stop"), "[DONE]"]
    servers = [await start_scripted(scripted_server, stream) for _ in range(2)]
    spec = parse_pipeline({
        "name": "fleet",
        "engines": {"default": {"kind": "openai", "base_url": [s.base_url for s in servers]}},
        "stages": [{"name": "gen", "kind": "lm", "prompt": "{text}", "max_tokens": 4}],
    })
    rt = Runtime(transport, [spec], config=RunnerConfig(block_ms=20, heartbeat_ms=50))
    await rt.start()
    try:
        done = await asyncio.gather(*(
            run_to_completion(transport, spec, f"q{i}", deadline_s=30) for i in range(6)
        ))
        roots = sorted(e.root for e in rt.engines.values() if isinstance(e, OpenAIEngine))
    finally:
        await rt.stop()
    assert all(events[-1]["type"] == "result" for _, events in done)
    assert len([r for r in rt.runners if r.stage.name == "gen"]) == 2
    assert roots == sorted(s.base_url for s in servers)
    assert sum(len(s.requests) for s in servers) == 6
