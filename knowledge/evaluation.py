"""Retrieval quality of a knowledge base: recall@k, MRR and nDCG@k over questions with known answers.

Each question names the documents that answer it (by id or by title), and may say which half of
a question set it belongs to (``"split": "tuning"`` or ``"holdout"``). For a question, with the
top k retrieved chunks read as their documents:

- recall@k is the share of its documents among them (a question needing two documents scores 0.5
  with one of them);
- the reciprocal rank is 1/rank of the first chunk from any of them (0 if none is in the top k);
- nDCG@k gives each of its documents a gain of 1 at the rank where it first appears,
  discounted by log2(rank + 1), over the best possible such sum (its documents at the top ranks).

The report averages them over the questions, lists every question's figures, and gives recall at
``RECALL_ALSO_AT`` too — the figures to compare when changing chunking, embedders or retrieval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from knowledge.models import Document, KnowledgeBase
from knowledge.retrieval import Mode, RankingParameters, retrieve
from tenants.errors import ValidationFailed

RECALL_ALSO_AT = 5
SPLITS = ("tuning", "holdout")


@dataclass(frozen=True, slots=True)
class EvaluationQuestion:
    question: str
    document_ids: frozenset[int]
    split: str = ""


@dataclass(slots=True)
class QuestionResult:
    question: str
    split: str
    recall: float
    recall_also: float  # recall at RECALL_ALSO_AT (or at k when k is smaller)
    reciprocal_rank: float
    ndcg: float
    expected_document_ids: list[int]
    retrieved_document_ids: list[int]

    def as_dict(self) -> dict:
        return {
            "question": self.question,
            "split": self.split,
            "recall": round(self.recall, 4),
            "reciprocal_rank": round(self.reciprocal_rank, 4),
            "ndcg": round(self.ndcg, 4),
            "expected": self.expected_document_ids,
            "retrieved": self.retrieved_document_ids,
        }


@dataclass(slots=True)
class EvaluationReport:
    k: int
    questions: int
    recall_at_k: float
    mrr: float
    ndcg_at_k: float = 0.0
    recall_also: float = 0.0
    results: list[QuestionResult] = field(default_factory=list)

    def as_dict(self, *, per_question: bool = False) -> dict:
        summary: dict[str, Any] = {
            "k": self.k,
            "questions": self.questions,
            f"recall@{self.k}": round(self.recall_at_k, 4),
            "mrr": round(self.mrr, 4),
            f"ndcg@{self.k}": round(self.ndcg_at_k, 4),
        }
        if self.k > RECALL_ALSO_AT:
            summary[f"recall@{RECALL_ALSO_AT}"] = round(self.recall_also, 4)
        summary["misses"] = [result.question for result in self.results if result.recall == 0]
        if per_question:
            summary["per_question"] = [result.as_dict() for result in self.results]
        return summary


def question_result(item: EvaluationQuestion, retrieved_document_ids: list[int], *, k: int) -> QuestionResult:
    """One question's figures from the documents of its top chunks, in rank order (chunks of one
    document may repeat; a document gains once, where it first appears)."""
    documents = retrieved_document_ids[:k]
    wanted = item.document_ids
    first = next((rank for rank, doc in enumerate(documents, start=1) if doc in wanted), None)
    gained: set[int] = set()
    dcg = 0.0
    for rank, document_id in enumerate(documents, start=1):
        if document_id in wanted and document_id not in gained:
            gained.add(document_id)
            dcg += 1.0 / math.log2(rank + 1)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(wanted), k) + 1))
    also = documents[: min(k, RECALL_ALSO_AT)]
    return QuestionResult(
        question=item.question,
        split=item.split,
        recall=len(wanted & set(documents)) / len(wanted),
        recall_also=len(wanted & set(also)) / len(wanted),
        reciprocal_rank=1.0 / first if first else 0.0,
        ndcg=dcg / ideal if ideal else 0.0,
        expected_document_ids=sorted(wanted),
        retrieved_document_ids=documents,
    )


def evaluation_report(results: list[QuestionResult], *, k: int) -> EvaluationReport:
    count = len(results)
    return EvaluationReport(
        k=k,
        questions=count,
        recall_at_k=sum(result.recall for result in results) / count if count else 0.0,
        mrr=sum(result.reciprocal_rank for result in results) / count if count else 0.0,
        ndcg_at_k=sum(result.ndcg for result in results) / count if count else 0.0,
        recall_also=sum(result.recall_also for result in results) / count if count else 0.0,
        results=results,
    )


def evaluation_questions_parse(*, knowledge_base: KnowledgeBase, lines: Iterable[str]) -> list[EvaluationQuestion]:
    """Parse JSONL: ``{"question": "...", "documents": [12, "Refund policy", ...]}`` per line
    (``"document"`` with one id or title is accepted too). Errors name the line."""
    titles: dict[str, set[int]] = {}
    ids: set[int] = set()
    for pk, title in Document.objects.filter(knowledge_base=knowledge_base).values_list("pk", "title"):
        titles.setdefault(title.casefold(), set()).add(pk)
        ids.add(pk)
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValidationFailed(f"Line {number}: not valid JSON ({error.msg}).") from error
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValidationFailed(f"Line {number}: needs a non-empty string 'question'.")
        references = row.get("documents", [row["document"]] if "document" in row else None)
        if not isinstance(references, list) or not references:
            raise ValidationFailed(f"Line {number}: needs 'documents', a non-empty list of document ids or titles.")
        wanted: set[int] = set()
        for reference in references:
            if isinstance(reference, int) and not isinstance(reference, bool) and reference in ids:
                wanted.add(reference)
            elif isinstance(reference, str) and reference.casefold() in titles:
                wanted |= titles[reference.casefold()]
            else:
                raise ValidationFailed(f"Line {number}: no document {reference!r} in this knowledge base.")
        split = row.get("split", "")
        if split not in ("", *SPLITS):
            raise ValidationFailed(f"Line {number}: 'split' must be one of {', '.join(SPLITS)}.")
        questions.append(
            EvaluationQuestion(question=row["question"].strip(), document_ids=frozenset(wanted), split=split)
        )
    if not questions:
        raise ValidationFailed("No questions to evaluate.")
    return questions


def knowledge_base_evaluate(
    *,
    knowledge_base: KnowledgeBase,
    questions: list[EvaluationQuestion],
    k: int = 10,
    mode: Mode = "hybrid",
    rerank: bool = True,
    parameters: RankingParameters | None = None,
) -> EvaluationReport:
    """Ask every question through :func:`~knowledge.retrieval.retrieve` (the lists ``mode`` names,
    the knowledge base's reranker unless ``rerank`` is false) and score the top ``k`` chunks."""
    results = []
    for item in questions:
        chunks = retrieve(
            knowledge_base_ids=[knowledge_base.pk],
            query=item.question,
            limit=k,
            mode=mode,
            rerank=rerank,
            parameters=parameters,
        )
        results.append(question_result(item, [chunk.document_id for chunk in chunks], k=k))
    return evaluation_report(results, k=k)
