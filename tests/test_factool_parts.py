"""The FacTool example's parts, each on its own: spec files, BM25 search, report, verdict
parsing, sim responders, corpus and example inputs. (The whole pipeline running on the
runtime is tested elsewhere.) Everything here is real: the shipped corpus, the real index,
the spec loaded by the real loader, prompts rendered by the real template code.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.factool import build_corpus, sim_responders
from examples.factool.retrieval import DEFAULT_CORPUS, Index, get_index, load_corpus
from examples.factool.tools import TOP_K, clean_query, report, search
from examples.factool.verdict import parse_verdict
from orchestrator.framing import frame_all
from orchestrator.spec import PipelineSpec, load_pipeline
from orchestrator.template import StageContext, render, variables
from workers.engines.tokens import count_tokens
from workers.stagefn import resolve

HERE = Path(__file__).resolve().parent.parent / "examples" / "factool"
SPECS = ("pipeline.yaml", "pipeline.sim.yaml")


def ctx(stage: str = "report", **values: Any) -> StageContext:
    return StageContext(run="r1", pipeline="factool", stage=stage, lineage=(), values=values)


@pytest.fixture(scope="module")
def sim_spec() -> PipelineSpec:
    return load_pipeline(HERE / "pipeline.sim.yaml")


@pytest.fixture(scope="module")
def inputs() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (HERE / "inputs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict[str, str]]:
    return {d["id"]: d for d in load_corpus(DEFAULT_CORPUS)}


# ----- spec files ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPECS)
def test_spec_loads_with_the_stages_asked_for(name: str) -> None:
    spec = load_pipeline(HERE / name)
    assert spec.name == "factool"
    assert spec.topo_order == ["claims", "queries", "search", "verify", "report"]
    assert spec.output_stage == "report"
    s = spec.by_name
    assert (s["claims"].kind, s["claims"].framing) == ("lm", "json_items")
    assert (s["queries"].kind, s["queries"].framing) == ("lm", "lines")
    assert (s["claims"].to, s["queries"].to) == (["queries"], ["search"])
    assert (s["search"].kind, s["search"].framing) == ("tool", "whole")
    assert s["search"].function == "examples.factool.tools:search"
    assert s["verify"].aggregate_by == ["request", "claims"]
    assert s["verify"].framing == "whole"
    assert (s["report"].kind, s["report"].aggregate_by) == ("reduce", ["request"])
    assert s["report"].function == "examples.factool.tools:report"
    assert [s[n].max_tokens for n in ("claims", "queries", "verify")] == [256, 64, 160]
    for n in ("claims", "queries", "verify"):
        assert s[n].system and s[n].prompt
    for n in ("search", "report"):  # the runtime's resolver imports what the spec names
        assert callable(resolve(s[n].function or "", stage=n, field_name="function"))


def test_sim_spec_differs_only_in_engines_and_responders() -> None:
    real, sim = (load_pipeline(HERE / n) for n in SPECS)
    assert real.engines["default"].kind == "local"
    assert sim.engines["default"].kind == "sim" and sim.engines["default"].instances == 4
    strip = {"engines": True, "stages": {"__all__": {"responder"}}}
    assert real.model_dump(exclude=strip) == sim.model_dump(exclude=strip)
    for stage in sim.stages:
        if stage.kind == "lm":
            assert stage.responder == f"examples.factool.sim_responders:{stage.name}"
            assert resolve(stage.responder, stage=stage.name, field_name="responder") is getattr(
                sim_responders, stage.name
            )
        else:
            assert stage.responder is None
    assert all(s.responder is None for s in real.stages)


def test_prompts_use_known_placeholders_and_share_a_long_prefix(sim_spec: PipelineSpec) -> None:
    allowed = {"claims": {"input"}, "queries": {"claims"}, "verify": {"claims", "items"}}
    for name, names in allowed.items():
        prompt = sim_spec.stage(name).prompt or ""
        assert set(variables(prompt)) == names, name
        a = render(prompt, {"input": "A.", "claims": "A.", "items": "[]"})
        b = render(prompt, {"input": "B b.", "claims": "B b.", "items": "[1]"})
        shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        # everything before the first placeholder is shared: instructions and the example
        first = prompt.index("{" + variables(prompt)[0] + "}")
        assert shared == first, name
        # with the system text, a few hundred characters every call of the stage shares
        assert len(sim_spec.stage(name).system or "") + shared >= 350, name
        # the prompt ends on the answer's opening tag, and `stop` on its closing one
        tag = {"claims": "claims", "queries": "queries", "verify": "verdict"}[name]
        assert prompt.rstrip().endswith(f"<{tag}>"), name
        assert sim_spec.stage(name).stop == [f"</{tag}>"], name


# ----- search ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("capital of France", {"country-FR", "city-2988507"}),
        ("Paris capital city", {"city-2988507"}),
        ("currency of Japan", {"country-JP-economy"}),
        ("iron atomic number", {"element-26"}),
        ("Mercury liquid room temperature", {"element-80"}),
        ("Germany borders", {"country-DE-borders"}),
        ("Texas largest cities", {"us-state-TX"}),
        ("Bogota Colombia capital", {"city-3688689", "country-CO"}),
    ],
)
def test_search_finds_the_passage_about_the_query(query: str, expected: set[str]) -> None:
    hits = search(query, ctx("search"))
    assert 1 <= len(hits) <= TOP_K
    assert hits[0]["id"] in expected, [h["id"] for h in hits]
    assert all(set(h) == {"id", "title", "text", "score"} for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0


def test_search_strips_list_markers_and_returns_nothing_for_empty_queries() -> None:
    plain = search("capital of France", ctx("search"))
    for marked in ("1. capital of France", "- capital of France", 'Query 2: "capital of France"'):
        assert clean_query(marked) == "capital of France"
        assert search(marked, ctx("search")) == plain
    assert search("", ctx("search")) == []
    assert search("Search queries for France:", ctx("search")) == []  # a header line
    assert search("</queries>", ctx("search")) == []  # the answer's closing tag
    assert search("the of and is", ctx("search")) == []  # stopwords only
    assert search("zzqxj wvkpt", ctx("search")) == []  # no word of the corpus


def test_index_is_built_once_even_when_threads_race(tmp_path: Path) -> None:
    path = tmp_path / "mini.jsonl"
    docs = [{"id": f"d{i}", "title": f"T{i}", "text": f"word{i} shared text"} for i in range(5)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    start = threading.Barrier(8)
    got: list[Index] = []

    def worker() -> None:
        start.wait(timeout=10)
        got.append(get_index(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 8 and all(g is got[0] for g in got)
    assert got[0].search("word3", 3)[0]["id"] == "d3"
    assert get_index() is get_index()


def test_load_corpus_rejects_malformed_passages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "title": "t"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_corpus(bad)


# ----- report and verdict parsing ---------------------------------------------------------------
def verdict_json(fact: Any, **extra: Any) -> str:
    return json.dumps({"reasoning": "r", "error": "none", "correction": "none",
                       "factuality": fact, **extra})


def test_report_mixes_true_false_and_unparseable() -> None:
    items = [
        verdict_json(True),
        "Sure! Here is my answer:\n```json\n" + verdict_json(False) + "\n```",
        "I cannot decide.",
        {"reasoning": "ok", "error": None, "correction": None, "factuality": "true"},
    ]
    claims = ["A is B.", "C is D.", "E is F.", "G is H."]
    out = report(items, ctx(claims=claims))
    assert [c["factuality"] for c in out["claims"]] == [True, False, None, True]
    assert [c["claim"] for c in out["claims"]] == claims
    assert out["claim_level_factuality"] == pytest.approx(0.5)
    assert out["response_factuality"] is False
    assert out["unverified"] == 1
    assert out["claims"][2]["raw"] == "I cannot decide."
    assert "raw" not in out["claims"][0]
    assert out["claims"][0]["error"] is None  # the prompt's "none" means no error
    assert out["claims"][0]["reasoning"] == "r"
    assert set(out["claims"][0]) == {"claim", "factuality", "error", "correction", "reasoning"}


def test_report_all_true_is_factual_and_empty_is_vacuously_factual() -> None:
    out = report([verdict_json(True), verdict_json("yes")], ctx())
    assert out["response_factuality"] is True and out["claim_level_factuality"] == 1.0
    assert [c["claim"] for c in out["claims"]] == [None, None]  # nobody said which claim
    empty = report([], ctx())
    assert empty == {"claims": [], "response_factuality": True, "claim_level_factuality": 1.0,
                     "unverified": 0}


def test_report_takes_claims_from_per_item_context_or_the_verdict() -> None:
    per_item = SimpleNamespace(values={"input": "x"},
                               item_values=[{"claims": "One."}, {"claims": "Two."}])
    out = report([verdict_json(True), verdict_json(False)], per_item)  # type: ignore[arg-type]
    assert [c["claim"] for c in out["claims"]] == ["One.", "Two."]
    echoed = report([verdict_json(True, claim="Echoed.")], ctx())
    assert echoed["claims"][0]["claim"] == "Echoed."
    # a claims list of the wrong length is not trusted
    assert report([verdict_json(True)], ctx(claims=["a", "b"]))["claims"][0]["claim"] is None


@pytest.mark.parametrize(
    ("raw", "fact", "kept"),
    [
        ('{"factuality": false}', False, False),
        ("```json\n{\"reasoning\": \"x\", \"factuality\": true}\n```", True, False),
        ("Answer: {'reasoning': 'x', 'error': None, 'factuality': True} Done.", True, False),
        ('{"reasoning": "a {b} c", "factuality": "False"}', False, False),
        ('{"note": 1} then {"factuality": true}', True, False),
        ('{"factuality": "maybe"}', None, False),  # an object, but no decision in it
        # truncated by max_tokens: the decision is recovered, the text kept
        ('{"reasoning": "long", "factuality": false, "correction": "unterminated', False, True),
        ('{"reasoning": "cut off by max_tok', None, True),
        ("The claim is probably right.", None, True),
        ("", None, True),
    ],
)
def test_verdicts_are_read_leniently(raw: str, fact: bool | None, kept: bool) -> None:
    v = parse_verdict(raw)
    assert v.factuality is fact
    assert (v.raw == raw) if kept else (v.raw is None and v.parsed)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("{}[]:,'\" ") + ["factuality", "true", "True", "None",
                                                     "1e999", "\\u00", "```"]),
                max_size=60).map("".join))
def test_verdict_parsing_never_fails_on_any_text(text: str) -> None:
    v = parse_verdict(text)
    assert v.factuality in (True, False, None)
    assert v.parsed or v.raw == text


_VERDICT_FORMS = st.sampled_from(["dict", "json", "fenced", "prose", "python", "garbage"])


def _render_verdict(form: str, fact: bool) -> Any:
    obj = {"reasoning": "because", "error": "none", "correction": "none", "factuality": fact}
    return {
        "dict": obj,
        "json": json.dumps(obj),
        "fenced": f"```json\n{json.dumps(obj, indent=2)}\n```",
        "prose": f"Here is the verdict: {json.dumps(obj)} Hope this helps.",
        "python": repr(obj),
        "garbage": "no idea {{ at all",
    }[form]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_VERDICT_FORMS, st.booleans()), max_size=12))
def test_report_counts_exactly_whatever_the_verdicts_look_like(
    verdicts: list[tuple[str, bool]],
) -> None:
    items = [_render_verdict(form, fact) for form, fact in verdicts]
    expected = [None if form == "garbage" else fact for form, fact in verdicts]
    out = report(items, ctx())
    assert [c["factuality"] for c in out["claims"]] == expected
    n_true = sum(1 for e in expected if e is True)
    assert out["claim_level_factuality"] == (n_true / len(items) if items else 1.0)
    assert out["response_factuality"] is all(e is True for e in expected)
    assert out["unverified"] == expected.count(None)
    json.dumps(out)  # the answer must be serialisable as is


# ----- sim responders ---------------------------------------------------------------------------
def render_stage(spec: PipelineSpec, stage: str, **values: Any) -> str:
    return render(spec.stage(stage).prompt or "", values)


def evidence_for(queries_text: str) -> str:
    """What the runtime puts in {items} for verify: one search result (JSON) per line."""
    lines = frame_all("lines", queries_text)
    return "\n".join(json.dumps(search(q, ctx("search"))) for q in lines)


def test_responders_chain_over_every_example_input(
    sim_spec: PipelineSpec, inputs: list[dict[str, Any]]
) -> None:
    for row in inputs:
        text = row["text"]
        out = sim_responders.claims(render_stage(sim_spec, "claims", input=text), None)
        claims = json.loads(out)
        assert isinstance(claims, list) and 3 <= len(claims) <= 8, row["id"]
        assert all(isinstance(c, str) and c for c in claims)
        # the runtime's json_items framing sees the same claims, one unit each
        assert frame_all("json_items", out) == claims
        for claim in claims:
            q = sim_responders.queries(render_stage(sim_spec, "queries", input=text, claims=claim))
            units = frame_all("lines", q)
            assert len(units) == 2 and all(u.strip() for u in units), (claim, q)
            v = sim_responders.verify(
                render_stage(sim_spec, "verify", input=text, claims=claim, items=evidence_for(q))
            )
            parsed = json.loads(v)
            # every answer fits its stage's max_tokens as the sim engine counts them
            for stage, answer in (("claims", out), ("queries", q), ("verify", v)):
                assert count_tokens(answer) <= sim_spec.stage(stage).max_tokens, (stage, answer)
            assert list(parsed) == ["reasoning", "error", "correction", "factuality"]
            assert isinstance(parsed["factuality"], bool)
            assert parse_verdict(v).factuality is parsed["factuality"]


def test_sim_verdicts_follow_the_evidence(sim_spec: PipelineSpec) -> None:
    def verdict(claim: str) -> bool:
        q = sim_responders.queries(render_stage(sim_spec, "queries", claims=claim))
        prompt = render_stage(sim_spec, "verify", claims=claim, items=evidence_for(q))
        return json.loads(sim_responders.verify(prompt))["factuality"]

    assert verdict("Paris is the capital of France.") is True
    assert verdict("The capital of Australia is Sydney.") is False
    assert verdict("Germany borders Poland.") is True
    assert verdict("Germany borders Spain.") is False
    assert verdict("Mercury is a liquid at room temperature.") is True
    assert verdict("Barcelona is the capital of Spain.") is False
    assert verdict("Mount Everest is the highest mountain.") is False  # not in the corpus


def test_sim_labels_agree_with_most_example_labels(
    sim_spec: PipelineSpec, inputs: list[dict[str, Any]]
) -> None:
    """The sim is a crude judge, but a judge: it must get the labelled claims mostly right."""
    agree = total = 0
    for row in inputs:
        for label in row["labels"]:
            q = sim_responders.queries(render_stage(sim_spec, "queries", claims=label["claim"]))
            prompt = render_stage(sim_spec, "verify", claims=label["claim"], items=evidence_for(q))
            total += 1
            agree += json.loads(sim_responders.verify(prompt))["factuality"] is label["factuality"]
    assert total >= 100 and agree / total >= 0.9


def test_claims_resolve_pronouns_and_split_short_texts() -> None:
    got = sim_responders.extract_claims(
        "Paris is the capital of France. It has 2 million people. Its mayor is elected."
    )
    assert got == ["Paris is the capital of France.", "Paris has 2 million people.",
                   "Paris's mayor is elected."]
    got = sim_responders.extract_claims("Iron has atomic number 26 and mercury is a liquid.")
    assert got[:2] == ["Iron has atomic number 26.", "Mercury is a liquid."] and len(got) == 3
    assert sim_responders.extract_claims("Antigua and Barbuda is a country. Tokyo is big.")[0] == (
        "Antigua and Barbuda is a country."
    )
    assert sim_responders.extract_claims("  \n ") == []
    assert len(sim_responders.extract_claims(" ".join(f"Fact {i} holds." for i in range(20)))) == 8


def test_responders_refuse_prompts_without_their_delimiters() -> None:
    for fn in (sim_responders.claims, sim_responders.queries, sim_responders.verify):
        with pytest.raises(ValueError, match="disagree"):
            fn("Split this text: Paris is in France.", None)


def test_queries_accept_a_json_encoded_claim(sim_spec: PipelineSpec) -> None:
    plain = sim_responders.queries(render_stage(sim_spec, "queries", claims="Tokyo is in Japan."))
    quoted = sim_responders.queries(
        render_stage(sim_spec, "queries", claims=json.dumps("Tokyo is in Japan."))
    )
    assert plain == quoted and "Tokyo" in plain


_PIECES = ["and ", "It ", "Its ", "The ", "St. ", "</text>", "<claim>", "</claim>", "<evidence>"]
_TEXT = st.lists(
    st.sampled_from(list("abcXYZ .,!?\n'\"-0123456789é<>{}[]") + _PIECES),
    max_size=120,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(_TEXT)
def test_responders_are_total_and_deterministic_on_any_input(text: str) -> None:
    spec = load_pipeline(HERE / "pipeline.sim.yaml")
    prompt = render_stage(spec, "claims", input=text)
    out = sim_responders.claims(prompt, None)
    assert out == sim_responders.claims(prompt, None)
    claims = json.loads(out)
    assert isinstance(claims, list) and len(claims) <= 8
    if any(ch.isalnum() for ch in text):
        assert len(claims) >= 3
    for claim in claims[:2]:
        q = sim_responders.queries(render_stage(spec, "queries", claims=claim))
        assert q == sim_responders.queries(render_stage(spec, "queries", claims=claim))
        assert len([x for x in q.split("\n") if x.strip()]) == 2
        vp = render_stage(spec, "verify", claims=claim, items=text)  # evidence may be anything
        v = sim_responders.verify(vp)
        assert v == sim_responders.verify(vp)
        assert isinstance(json.loads(v)["factuality"], bool)


# ----- corpus and example inputs ----------------------------------------------------------------
def test_corpus_is_the_promised_size_with_unique_ids(corpus: dict[str, dict[str, str]]) -> None:
    assert 2000 <= len(corpus) <= 5000
    assert DEFAULT_CORPUS.stat().st_size < 3_000_000
    lines = DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(corpus)  # ids are unique
    assert all(d["text"].strip() and d["title"].strip() for d in corpus.values())


def test_example_inputs_are_labelled_from_the_corpus(
    inputs: list[dict[str, Any]], corpus: dict[str, dict[str, str]]
) -> None:
    assert 40 <= len(inputs) <= 80
    assert len({r["id"] for r in inputs}) == len(inputs)
    facts = [lab["factuality"] for r in inputs for lab in r["labels"]]
    assert facts.count(True) >= 20 and facts.count(False) >= 20
    for row in inputs:
        n_sentences = len(re.findall(r"[.!?](?:\s|$)", row["text"]))
        assert 2 <= n_sentences <= 6, row["id"]
        for lab in row["labels"]:
            passage = corpus[lab["evidence"]]
            assert lab["quote"] in passage["text"], (row["id"], lab["claim"])


def test_periodic_table_rules_used_by_the_corpus_builder() -> None:
    cases = {1: (1, 1), 2: (1, 18), 6: (2, 14), 26: (4, 8), 55: (6, 1), 57: (6, None),
             72: (6, 4), 79: (6, 11), 86: (6, 18), 92: (7, None), 118: (7, 18)}
    for z, (period, group) in cases.items():
        assert (build_corpus.period_of(z), build_corpus.group_of(z)) == (period, group), z
    assert build_corpus.category_of(80) == "a transition metal"
    assert build_corpus.country_ref("United Kingdom") == "the United Kingdom"
    assert build_corpus.country_ref("The Netherlands", start=True) == "The Netherlands"
    assert build_corpus.people(2_138_551) == "2,138,551 (about 2.1 million)"
