"""Real corpora for the retrieval-quality benchmark, and the naive baseline it must beat.

The corpora are reference documentation that ships inside PyPI packages the project installs
(versions pinned in pyproject.toml's ``bench`` extra), one document per public function, its
docstring as Markdown under the function's qualified name:

- ``networkx``: the functions of ``networkx.algorithms`` (graph algorithms: paths, flows,
  centrality, connectivity, …), about 415 documents;
- ``numpy``: the public functions of the ``numpy`` namespace (array creation, manipulation,
  statistics, I/O, …), about 370 documents; aliases (``abs``/``absolute``) are one document.

The questions (``retrieval_questions/<corpus>.jsonl``) were written by hand before any
measurement, name their documents by title, alternate between the tuning half and the holdout half,
and include questions that need two documents.

The naive baseline is the 40-line script the issue describes: 180-word chunks, textbook BM25
(k1 = 1.5, b = 0.75, lower-cased word tokens, no stemming, no stop words), all-MiniLM-L6-v2
cosine similarity, and reciprocal rank fusion (k = 60) over the top 200 of each list.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUESTIONS_DIRECTORY = Path(__file__).parent / "retrieval_questions"
CORPORA = ("networkx", "numpy")


@dataclass(frozen=True, slots=True)
class CorpusDocument:
    title: str
    markdown: str


def _function_documents(module_name: str, namespace, prefix: str) -> list[CorpusDocument]:
    documents: dict[str, CorpusDocument] = {}
    for name in sorted(dir(namespace)):
        item = getattr(namespace, name)
        if name.startswith("_") or inspect.isclass(item) or not callable(item) or inspect.ismodule(item):
            continue
        doc = inspect.getdoc(item) or ""
        if len(doc.split()) < 5:
            continue
        canonical = getattr(item, "__name__", name)
        title = f"{prefix}{canonical}"
        if title in documents:  # an alias of a function already taken
            continue
        try:
            signature = f"{canonical}{inspect.signature(item)}"
        except (TypeError, ValueError):
            signature = canonical
        documents[title] = CorpusDocument(title=title, markdown=f"# {title}\n\n`{signature}`\n\n{doc}\n")
    return list(documents.values())


def corpus_documents(corpus: str) -> list[CorpusDocument]:
    if corpus == "networkx":
        import networkx

        return _function_documents("networkx", networkx.algorithms, "networkx.")
    if corpus == "numpy":
        return _function_documents("numpy", np, "numpy.")
    raise ValueError(corpus)


def corpus_version(corpus: str) -> str:
    return importlib.import_module(corpus).__version__


def question_rows(corpus: str) -> list[dict]:
    lines = (QUESTIONS_DIRECTORY / f"{corpus}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# --- the naive baseline ---------------------------------------------------------------------------

NAIVE_CHUNK_WORDS = 180
NAIVE_DEPTH = 200
NAIVE_RRF_K = 60
_WORD = re.compile(r"\w+")


def naive_chunks(documents: list[CorpusDocument]) -> list[tuple[int, str]]:
    """(document index, text) per 180-word chunk, no overlap."""
    chunks = []
    for index, document in enumerate(documents):
        words = document.markdown.split()
        for start in range(0, len(words), NAIVE_CHUNK_WORDS):
            chunks.append((index, " ".join(words[start : start + NAIVE_CHUNK_WORDS])))
    return chunks


class TextbookBM25:
    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.frequencies = [Counter(_WORD.findall(text.lower())) for text in texts]
        self.lengths = [sum(counts.values()) for counts in self.frequencies]
        self.mean_length = sum(self.lengths) / len(self.lengths)
        document_frequency: Counter[str] = Counter()
        for counts in self.frequencies:
            document_frequency.update(counts.keys())
        total = len(texts)
        self.idf = {term: math.log(1 + (total - df + 0.5) / (df + 0.5)) for term, df in document_frequency.items()}

    def rank(self, query: str, depth: int) -> list[int]:
        terms = [term for term in set(_WORD.findall(query.lower())) if term in self.idf]
        scores = []
        for index, counts in enumerate(self.frequencies):
            norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / self.mean_length)
            score = sum(
                self.idf[term] * counts[term] * (self.k1 + 1) / (counts[term] + norm)
                for term in terms
                if term in counts
            )
            if score > 0:
                scores.append((score, index))
        scores.sort(key=lambda pair: (-pair[0], pair[1]))
        return [index for _, index in scores[:depth]]


@dataclass(slots=True)
class NaiveBaseline:
    chunks: list[tuple[int, str]]
    bm25: TextbookBM25
    vectors: np.ndarray

    @classmethod
    def build(cls, documents: list[CorpusDocument], embed: Callable[[list[str]], np.ndarray]) -> NaiveBaseline:
        chunks = naive_chunks(documents)
        texts = [text for _, text in chunks]
        return cls(chunks=chunks, bm25=TextbookBM25(texts), vectors=embed(texts))

    def search(self, query: str, query_vector: np.ndarray, *, mode: str, limit: int) -> list[int]:
        """Document indices of the top ``limit`` chunks (``mode``: bm25, vector or rrf)."""
        text_ranked = self.bm25.rank(query, NAIVE_DEPTH)
        similarities = self.vectors @ query_vector
        vector_ranked = [int(index) for index in np.argsort(-similarities, kind="stable")[:NAIVE_DEPTH]]
        if mode == "bm25":
            ranked = text_ranked
        elif mode == "vector":
            ranked = vector_ranked
        else:
            scores: dict[int, float] = {}
            for ranking in (text_ranked, vector_ranked):
                for rank, index in enumerate(ranking, start=1):
                    scores[index] = scores.get(index, 0.0) + 1.0 / (NAIVE_RRF_K + rank)
            ranked = sorted(scores, key=lambda index: (-scores[index], index))
        return [self.chunks[index][0] for index in ranked[:limit]]
