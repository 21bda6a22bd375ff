"""Deterministic stand-ins for the LM stages, used by `pipeline.sim.yaml`.

A simulated engine still has to produce *structurally real* text, or the framing,
aggregation and report downstream would be exercised on nothing: so each responder reads
what a real LM would read (the rendered prompt, nothing else), finds the real case after
the prompt's worked examples and between its `<tag>` delimiters, and writes the answer in
the format the examples show (without the closing tag, where the stage's `stop` would end
a real model). Outputs are pure functions of the prompt: same prompt, same text.

- `claims`: the input's sentences, cleaned and with leading pronouns resolved, as a JSON
  list of 3-8 claims (clauses split, or restatements added, when sentences are too few).
- `queries`: two lines built from the claim's content words and named entities.
- `verify`: true iff one evidence sentence, in a passage about one of the claim's names,
  contains every content word of the claim and no rank ("second largest") it lacks;
  the verdict is the JSON object the prompt asks for.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from workers.engines.tokens import count_tokens

MIN_CLAIMS, MAX_CLAIMS = 3, 8
VERDICT_TOKENS = 150  # below the verify stage's max_tokens (160), or the JSON is cut
_STOP_TEXT = """a an the and or but of in on at to for from by with as is are was were be been being
    it its it's this that these those there their they them he she his her has have had do does
    did not no than then so such also about approximately around roughly nearly over under
    into onto which who whom whose what when where while very more most many much some any
    each every both either neither one can could may might will would shall should
    according text stated"""
STOPWORDS = frozenset(_STOP_TEXT.split())
_ABBREV = frozenset({"st", "mt", "mr", "mrs", "dr", "u.s", "e.g", "i.e", "approx", "vs"})
_CONNECTIVE = re.compile(
    r"^(?:also|however|moreover|furthermore|in addition|besides|finally|and|but)\s*,?\s+",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W_](?:[\w'’.,-]*[^\W_])?")
_SUBJECT = re.compile(r"^((?:The\s+)?[A-Z][\w'’.-]*(?:\s+(?:of|de|del|and|the|[A-Z][\w'’.-]*))*)")


# ----- reading the prompt ------------------------------------------------------------------
def _real_case(prompt: str, answer_tag: str) -> str:
    """The part of the prompt after its worked examples (each ends with </answer_tag>)."""
    close = f"</{answer_tag}>"
    i = prompt.rfind(close)
    if i == -1:
        raise ValueError(f"prompt has no worked example ending in {close}; the sim responder "
                         "and the pipeline's prompt template disagree")
    return prompt[i + len(close):]


def _block(text: str, tag: str, *, last_close: bool = False) -> tuple[str, int]:
    """The text inside the first <tag>...</tag> of `text` (closing: first, or last one)."""
    open_t, close_t = f"<{tag}>", f"</{tag}>"
    i = text.find(open_t)
    j = -1
    if i != -1:
        j = text.rfind(close_t) if last_close else text.find(close_t, i + len(open_t))
    if i == -1 or j < i:
        raise ValueError(f"prompt has no {open_t}...{close_t} block; the sim responder and the "
                         "pipeline's prompt template disagree")
    return text[i + len(open_t):j].strip("\n"), j + len(close_t)


def _unquote(claim: str) -> str:
    """A claim unit may arrive JSON-encoded ("\\"Paris is ...\\""); take its text."""
    c = claim.strip()
    if c.startswith('"') and c.endswith('"'):
        try:
            v = json.loads(c)
        except json.JSONDecodeError:
            return c
        if isinstance(v, str):
            return v.strip()
    return c


# ----- words -------------------------------------------------------------------------------
def _fold(text: str) -> str:
    norm = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in norm if not unicodedata.combining(ch))


def _norm(word: str) -> str:
    """Lower-case, accent-free, digits without separators, crude plural stripping."""
    w = _fold(word).lower().replace("’", "'").strip(".,'")
    if re.fullmatch(r"[\d.,]+", w):
        return w.replace(",", "")
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _words(text: str) -> list[str]:
    return [w.strip(".,") for w in _WORD.findall(text)]


def _content(text: str) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for w in _words(text):
        n = _norm(w)
        if n and n not in STOPWORDS and n not in seen:
            seen.add(n)
            out.append(w)
    return out


def _is_entity(word: str, first: bool) -> bool:
    if any(ch.isdigit() for ch in word):
        return True
    return word[:1].isupper() and not (first and word.lower() in STOPWORDS)


def _entities(text: str) -> list[str]:
    words = _words(text)
    return [w for i, w in enumerate(words) if _is_entity(w, i == 0) and _norm(w) not in STOPWORDS]


# ----- claims ------------------------------------------------------------------------------
def _sentences(text: str) -> list[str]:
    """Split on . ! ? and newlines, but not after 'St.', 'U.S.' or inside numbers."""
    out: list[str] = []
    for para in text.splitlines():
        start = 0
        for m in re.finditer(r"[.!?](?=\s+|$)", para):
            prev = para[start:m.start()].split()
            last = prev[-1].lower() if prev else ""
            if last in _ABBREV:
                continue
            out.append(para[start:m.end()].strip())
            start = m.end()
        if para[start:].strip():
            out.append(para[start:].strip())
    return [s for s in out if any(ch.isalnum() for ch in s)]


def _finish(text: str) -> str:
    text = " ".join(text.split()).strip(" ,;:")
    text = _CONNECTIVE.sub("", text)
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _resolve(sentence: str, subject: str | None) -> str:
    if subject:
        sentence = re.sub(r"^(It|They)\b", subject, sentence)
        sentence = re.sub(r"^(Its|Their)\b", f"{subject}'s", sentence)
    return sentence


def _subject(sentence: str) -> str | None:
    m = _SUBJECT.match(sentence)
    if not m:
        ents = _entities(sentence)
        return ents[0] if ents else None
    subj = re.sub(r"\s+(?:of|de|del|and|the)$", "", m.group(1))
    if subj not in ("It", "Its", "They", "Their", "The"):
        return subj
    ents = _entities(sentence)  # "The capital of Australia is ..." -> Australia
    return ents[0] if ents else None


_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|uses|use|lies|lie|borders|border)\b")


def _clauses(sentence: str) -> list[str]:
    """'A is x and B has y' -> two claims; 'Antigua and Barbuda is x' stays whole."""
    parts = re.split(r";\s+|,?\s+and\s+", sentence)
    out: list[str] = []
    for part in parts:
        if out and not (_VERB.search(out[-1]) and _VERB.search(part)):
            out[-1] = f"{out[-1]} and {part}"  # not two clauses: glue back
        else:
            out.append(part)
    return [c for c in (_finish(x) for x in out) if c]


def _restate(claim: str, n: int) -> str:
    first = claim.split(" ", 1)[0]
    body = claim[0].lower() + claim[1:] if first.lower() in STOPWORDS else claim
    return f"According to the text, {body}" if n == 0 else f"It is stated that {body}"


def extract_claims(text: str) -> list[str]:
    sents = [c for c in (_finish(s) for s in _sentences(text)) if c]
    if not sents:
        return []
    if len(sents) < MIN_CLAIMS:  # too few sentences: split compound ones into clauses
        sents = [c for s in sents for c in _clauses(s)]
    claims: list[str] = []
    subject: str | None = None
    for s in sents:
        resolved = _resolve(s, subject)
        subject = _subject(resolved) or subject
        if resolved not in claims:
            claims.append(resolved)
    base = list(claims)
    i = 0
    while len(claims) < MIN_CLAIMS:  # still too few: restate (a real LM pads like this too)
        claims.append(_restate(base[i % len(base)], i // len(base)))
        i += 1
    return claims[:MAX_CLAIMS]


def claims(prompt: str, params: Any = None) -> str:
    """JSON list of claims, one item per line (as an LM pretty-printing would)."""
    text, _ = _block(_real_case(prompt, "claims"), "text", last_close=True)
    items = extract_claims(text)
    if not items:
        return "[]"
    return "[\n" + ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in items) + "\n]"


# ----- queries -----------------------------------------------------------------------------
def make_queries(claim: str) -> tuple[str, str]:
    content = _content(claim)
    if not content:
        text = " ".join(claim.split()[:8]) or "fact check"
        return text, f"{text} facts"
    q1 = " ".join(content[:8])
    ents = list(dict.fromkeys(_entities(claim)))[:4]
    rest = [w for w in content if w not in ents][:2]
    q2 = " ".join(ents + rest) if ents else " ".join(reversed(content[:4]))
    if _norm(q2) == _norm(q1) or not q2:
        q2 = f"{' '.join(content[:3])} facts"
    return q1, q2


def queries(prompt: str, params: Any = None) -> str:
    claim, _ = _block(_real_case(prompt, "queries"), "claim", last_close=True)
    q1, q2 = make_queries(_unquote(claim))
    return f"1. {q1}\n2. {q2}\n"  # numbered, like the prompt's example


# ----- verify ------------------------------------------------------------------------------
def _passages(evidence: str) -> list[dict[str, str]]:
    """Evidence lines are search outputs (JSON lists of passages); plain text also works."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for n, line in enumerate(evidence.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            val: Any = json.loads(line)
        except json.JSONDecodeError:
            val = line
        for p in val if isinstance(val, list) else [val]:
            if isinstance(p, dict):
                pid = str(p.get("id", f"line{n}"))
                title, text = str(p.get("title", "")), str(p.get("text", ""))
            else:
                pid, title, text = f"line{n}", "", str(p)
            if pid not in seen:
                seen.add(pid)
                out.append({"id": pid, "title": title, "text": text})
    return out


# relation words a passage may express differently ("uses the euro" / "currency is the euro")
_LIGHT = frozenset({"use", "located", "lie", "situated", "known", "called", "official", "main"})
# ranks change what a sentence asserts: evidence saying "second largest" does not
# support a claim of "largest"
_QUALIFIERS = frozenset({"second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                         "ninth", "tenth"})
_NTH = re.compile(r"^\d+(?:st|nd|rd|th)$")


def _units(p: dict[str, str]) -> list[tuple[str, set[str], set[str]]]:
    """A passage's sentences as (sentence, its words, the passage title's words)."""
    title = {_norm(w) for w in _words(p["title"])}
    sents = [x for x in re.split(r"(?<=[.!?])\s+", p["text"]) if x.strip()]
    return [(x, {_norm(w) for w in _words(x)}, title) for x in sents]


def _short(sentence: str, words: int = 25) -> str:
    """Keep a quoted sentence short, so the verdict fits the stage's max_tokens (160)."""
    parts = sentence.split()
    return sentence if len(parts) <= words else " ".join(parts[:words]) + " ..."


def _listing(words: list[str]) -> str:
    words = list(dict.fromkeys(words))
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _lower_first(text: str) -> str:
    first = text.split(" ", 1)[0]
    return text[0].lower() + text[1:] if first.lower() in STOPWORDS else text


def judge(claim: str, evidence: str) -> dict[str, Any]:
    """True iff some evidence sentence, in a passage about one of the claim's names, holds
    every content word of the claim and no rank the claim lacks. Crude, but it tells
    'the capital of Australia is Canberra' from '... is Sydney' as a careful reader would.

    The reasoning is written the way FacTool's KB-QA verifier answers (its
    agreement_verification prompt asks why the text is or is not factual and, for a
    non-factual verdict, for *multiple* evidences): restate the claim, quote the deciding
    evidence (and, for a false claim, a second passage), then conclude. That makes a
    verdict 70-150 tokens long, as FacTool's are, instead of one short sentence.
    """
    claim_words = {_norm(w) for w in _words(claim)}
    keys = list(dict.fromkeys(_norm(w) for w in _content(claim)))
    need = [k for k in keys if k not in _LIGHT]
    ents = {_norm(w) for w in _entities(claim)}
    # best sentence per passage, then passages best first
    per: dict[str, tuple[tuple[bool, int, int], dict[str, str], str, set[str], list[str]]] = {}
    for p in _passages(evidence):
        for sent, have, title in _units(p):
            found = {k for k in need if k in have or k in title}
            extra = sorted(w for w in have - claim_words if w in _QUALIFIERS or _NTH.match(w))
            score = (not ents or bool(ents & title), len(found), -len(extra))
            if p["id"] not in per or score > per[p["id"]][0]:
                per[p["id"]] = (score, p, sent, found, extra)
    ranked = sorted(per.values(), key=lambda c: c[0], reverse=True)
    said = f"The text claims that {_lower_first(claim.rstrip('.'))}."
    if not ranked or not need:
        return {
            "reasoning": f"{said} None of the evidence passages mentions "
                         f"{_listing(need[:4]) or 'it'}, so the evidence does not support it.",
            "error": "The claim is not supported by the evidence.",
            "correction": "none",
            "factuality": False,
        }
    (about, _, _), p, sent, found, extra = ranked[0]
    name = p["title"] or p["id"]
    shown = {_norm(w): w for w in _content(claim)}  # normalised key -> the claim's own word
    missing = [k for k in need if k not in found][:6]
    if about and not missing and not extra:
        agreed = _listing([shown.get(k, k) for k in need if k in found][:6])
        return {
            "reasoning": f"{said} The evidence from '{name}' says: \"{_short(sent)}\" It states "
                         f"{agreed} as the claim does, so the claim is factual.",
            "error": "none",
            "correction": "none",
            "factuality": True,
        }
    if missing:
        why = f"does not support {', '.join(shown.get(k, k) for k in missing)}"
    elif extra:
        why = f"qualifies it with {', '.join(extra)}"
    else:
        why = "is about something else"
    other = ranked[1] if len(ranked) > 1 else None

    def build(words: int) -> dict[str, Any]:
        second = ""
        if other is not None:
            _, p2, sent2, _, _ = other
            second = (f" The passage '{p2['title'] or p2['id']}' says: "
                      f"\"{_short(sent2, max(4, words - 6))}\", which does not support the "
                      "claim either.")
        return {
            "reasoning": f"{said} The closest evidence, '{name}', says: "
                         f"\"{_short(sent, words)}\" It {why}.{second} So the claim is not "
                         "factual.",
            "error": f"The evidence {why}.",
            "correction": _short(sent, words),
            "factuality": False,
        }

    for words in (20, 14, 10, 6, 3):  # long numbers ("3,820,914") cost many tokens each
        out = build(words)
        if count_tokens(json.dumps(out, ensure_ascii=False)) <= VERDICT_TOKENS:
            break
    return out


def verify(prompt: str, params: Any = None) -> str:
    case = _real_case(prompt, "verdict")
    claim, end = _block(case, "claim")
    evidence, _ = _block(case[end:], "evidence", last_close=True)
    return json.dumps(judge(_unquote(claim), evidence), ensure_ascii=False)
