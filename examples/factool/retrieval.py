"""BM25 retrieval over the example's shipped corpus.

The index is built once per process, on first use, under a lock: building takes about a
second, and every tool instance in a worker shares it. Queries afterwards only read the
index (the tokenizer runs with `update_vocab=False`, so it never mutates the vocabulary),
which is why searches themselves need no lock and can run from many threads at once.
"""

from __future__ import annotations

import gzip
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.tokenization import Tokenizer

HERE = Path(__file__).parent
DEFAULT_CORPUS = HERE / "corpus.jsonl"


def load_corpus(path: Path) -> list[dict[str, str]]:
    """Read passages ({"id", "title", "text"}, one JSON object per line; .gz allowed)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict[str, str]] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not all(isinstance(row.get(k), str) for k in ("id", "title", "text")):
                raise ValueError(f"{path}:{n}: a passage needs string id, title and text")
            rows.append({"id": row["id"], "title": row["title"], "text": row["text"]})
    if not rows:
        raise ValueError(f"{path}: empty corpus")
    return rows


@dataclass(frozen=True, slots=True)
class Index:
    docs: list[dict[str, str]]
    tokenizer: Tokenizer
    retriever: bm25s.BM25
    empty_id: int | None  # the id bm25s gives a query with no known word

    @classmethod
    def build(cls, docs: list[dict[str, str]]) -> Index:
        tok = Tokenizer(lower=True, stopwords="en")
        # the title is indexed too: it names the entity a passage is about
        texts = [f"{d['title']}. {d['text']}" for d in docs]
        corpus_tokens = tok.tokenize(texts, update_vocab=True, return_as="tuple",
                                     show_progress=False)
        retriever = bm25s.BM25()
        retriever.index(corpus_tokens, show_progress=False)
        return cls(docs, tok, retriever, tok.word_to_id.get(""))

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """Top-k passages for `query`, best first, each with its BM25 score (> 0 only)."""
        ids = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids",
                                      show_progress=False)[0]
        ids = [i for i in ids if i != self.empty_id]
        if not ids or k <= 0:
            return []
        k = min(k, len(self.docs))
        idx, scores = self.retriever.retrieve([ids], k=k, show_progress=False, n_threads=1)
        out: list[dict[str, Any]] = []
        for i, s in zip(np.asarray(idx)[0].tolist(), np.asarray(scores)[0].tolist(), strict=True):
            if s <= 0:
                continue
            d = self.docs[int(i)]
            out.append({"id": d["id"], "title": d["title"], "text": d["text"],
                        "score": round(float(s), 4)})
        return out


_lock = threading.Lock()
_indexes: dict[Path, Index] = {}


def get_index(path: Path = DEFAULT_CORPUS) -> Index:
    """The index for `path`, built on first call (once, even when threads race)."""
    path = path.resolve()
    idx = _indexes.get(path)
    if idx is not None:
        return idx
    with _lock:
        idx = _indexes.get(path)
        if idx is None:
            idx = Index.build(load_corpus(path))
            _indexes[path] = idx
    return idx
