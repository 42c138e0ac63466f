"""Retrieval quality of a knowledge base: recall@k and MRR over questions with known answers.

Each question names the documents that answer it (by id or by title). For a question,
recall@k is the share of those documents that appear among the top k retrieved chunks' documents,
and the reciprocal rank is 1/rank of the first chunk from any of them (0 if none is in the top k).
The report averages both over the questions — the figures to compare when changing chunking,
embedders or retrieval settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from knowledge.models import Document, KnowledgeBase
from knowledge.retrieval import retrieve
from tenants.errors import ValidationFailed


@dataclass(frozen=True, slots=True)
class EvaluationQuestion:
    question: str
    document_ids: frozenset[int]


@dataclass(slots=True)
class QuestionResult:
    question: str
    recall: float
    reciprocal_rank: float
    retrieved_document_ids: list[int]


@dataclass(slots=True)
class EvaluationReport:
    k: int
    questions: int
    recall_at_k: float
    mrr: float
    results: list[QuestionResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "k": self.k,
            "questions": self.questions,
            f"recall@{self.k}": round(self.recall_at_k, 4),
            "mrr": round(self.mrr, 4),
            "misses": [result.question for result in self.results if result.recall == 0],
        }


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
        questions.append(EvaluationQuestion(question=row["question"].strip(), document_ids=frozenset(wanted)))
    if not questions:
        raise ValidationFailed("No questions to evaluate.")
    return questions


def knowledge_base_evaluate(
    *, knowledge_base: KnowledgeBase, questions: list[EvaluationQuestion], k: int = 10
) -> EvaluationReport:
    results = []
    for item in questions:
        chunks = retrieve(knowledge_base_ids=[knowledge_base.pk], query=item.question, limit=k)
        documents = [chunk.document_id for chunk in chunks]
        found = item.document_ids & set(documents)
        first = next((rank for rank, doc in enumerate(documents, start=1) if doc in item.document_ids), None)
        results.append(
            QuestionResult(
                question=item.question,
                recall=len(found) / len(item.document_ids),
                reciprocal_rank=1.0 / first if first else 0.0,
                retrieved_document_ids=documents,
            )
        )
    return EvaluationReport(
        k=k,
        questions=len(results),
        recall_at_k=sum(result.recall for result in results) / len(results),
        mrr=sum(result.reciprocal_rank for result in results) / len(results),
        results=results,
    )
