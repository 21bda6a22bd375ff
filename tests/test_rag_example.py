"""The RAG example (examples/rag): its parts on constructed cases, and whole runs over a
real gateway with the official OpenAI SDK on the simulated engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.main import create_app
from examples.rag import sim_responders, tools
from orchestrator.spec import PipelineSpec, load_pipeline
from orchestrator.template import StageContext, render
from tests.gateway_fixtures import LiveServer
from workers.settings import Settings

HERE = Path(__file__).resolve().parent.parent / "examples" / "rag"


def _ctx(passages: Any = None, **params: Any) -> StageContext:
    values = {} if passages is None else {"retrieve": passages}
    return StageContext(run="r", pipeline="rag", stage="cite", lineage=(),
                        values=values, params=params)


@pytest.fixture(scope="module")
def sim_spec() -> PipelineSpec:
    return load_pipeline(HERE / "pipeline.sim.yaml")


def test_the_sim_spec_differs_only_in_engines_and_the_responder(sim_spec: PipelineSpec) -> None:
    real = load_pipeline(HERE / "pipeline.yaml")
    assert real.engines["default"].kind == "local" and sim_spec.engines["default"].kind == "sim"
    for a, b in zip(real.stages, sim_spec.stages, strict=True):
        assert a.model_dump(exclude={"responder"}) == b.model_dump(exclude={"responder"})
    assert [s.name for s in real.stages] == ["retrieve", "answer", "cite", "report"]


def test_retrieve_finds_the_passage_about_the_question() -> None:
    found = tools.retrieve("What is the capital of Australia?", _ctx(top_k=4))
    assert 0 < len(found) <= 4 and set(found[0]) == {"id", "title", "text"}
    assert "country-AU" in [p["id"] for p in found]


PASSAGES = [
    {"id": "au", "title": "Australia", "text": "The capital of Australia is Canberra."},
    {"id": "jp", "title": "Japan", "text": "The currency of Japan is the yen."},
]


@pytest.mark.parametrize("encoded", [False, True])
def test_cite_picks_the_passage_that_supports_the_sentence(encoded: bool) -> None:
    import json

    ctx = _ctx(json.dumps(PASSAGES) if encoded else PASSAGES)
    got = tools.cite("Japan uses the yen as its currency.", ctx)
    # japan, yen, currency of {japan, uses, yen, currency}
    assert got["source"] == {"id": "jp", "title": "Japan"} and got["support"] == 0.75
    none = tools.cite("Mars has two moons.", ctx)
    assert none["source"] is None and none["support"] < tools.MIN_SUPPORT


def test_cite_support_threshold_comes_from_the_stage_params() -> None:
    sentence = "Canberra has old museums."  # 1 of 3 content words in the passage
    assert tools.cite(sentence, _ctx(PASSAGES))["source"] is None
    assert tools.cite(sentence, _ctx(PASSAGES, min_support=0.3))["source"]["id"] == "au"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.one_of(st.none(), st.text(max_size=50),
                                        st.lists(st.dictionaries(st.text(max_size=5),
                                                                 st.text(max_size=20)))))
def test_cite_is_total_and_cites_only_retrieved_passages(sentence: str, passages: Any) -> None:
    got = tools.cite(sentence, _ctx(passages))
    assert got["sentence"] == sentence.strip() and 0.0 <= got["support"] <= 1.0
    if got["source"] is not None:
        assert isinstance(passages, list) and any(p.get("id") == got["source"]["id"]
                                                  for p in passages)


def test_report_numbers_sources_by_first_use_and_marks_unsupported() -> None:
    items = [
        {"sentence": "Japan uses the yen.", "source": {"id": "jp", "title": "Japan"}},
        {"sentence": "Canberra is the capital.", "source": {"id": "au", "title": "Australia"}},
        {"sentence": "Mars has two moons!", "source": None},
        '{"sentence": "Yen coins exist.", "source": {"id": "jp", "title": "Japan"}}',
    ]
    text = tools.report(items, _ctx())
    assert text == ("Japan uses the yen [1]. Canberra is the capital [2]. "
                    "Mars has two moons [?]! Yen coins exist [1].\n\n"
                    "Sources:\n[1] Japan\n[2] Australia")
    assert tools.report([], _ctx()) == "The passages found do not answer the question."


def test_the_sim_answer_uses_only_sentences_of_the_passages(sim_spec: PipelineSpec) -> None:
    stage = sim_spec.stage("answer")
    passages = tools.retrieve("What currency does Japan use?", _ctx(top_k=4))
    prompt = render(stage.prompt or "", {"input": "What currency does Japan use?",
                                   "retrieve": passages})
    text = sim_responders.answer(prompt)
    assert "yen" in text.lower()
    corpus_text = " ".join(p["text"] for p in passages)
    assert all(s.strip() in corpus_text for s in text.split(". ") if s.strip())


@pytest.fixture(scope="module")
def server(sim_spec: PipelineSpec) -> Iterator[LiveServer]:
    live = LiveServer(create_app(Settings(), [sim_spec]),
                      env={"ALTO_SIM_TIME_SCALE": "0.001"}).start()
    try:
        yield live
    finally:
        live.stop()


def test_a_chat_completion_answers_with_cited_sentences(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="rag", messages=[{"role": "user", "content": "What is the capital of Australia?"}])
    text = reply.choices[0].message.content or ""
    assert "Canberra [1]" in text and "Sources:\n[1] Australia" in text


def test_streamed_partials_cite_each_sentence_as_it_is_written(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="rag", stream=True,
        messages=[{"role": "user", "content": "What currency does Japan use?"}])
    partials: list[dict[str, Any]] = []
    content = ""
    for chunk in stream:
        extra = (chunk.model_extra or {}).get("alto") or {}
        if extra.get("event") == "partial":
            partials.append(extra)
        if chunk.choices and chunk.choices[0].delta.content:
            content += chunk.choices[0].delta.content
    sentences = [p for p in partials if p["stage"] == "answer"]
    citations = [p for p in partials if p["stage"] == "cite"]
    assert sentences and len(citations) == len(sentences)
    assert "yen" in content.lower() and content.count("[") >= len(sentences)
