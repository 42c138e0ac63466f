"""The retrieval evaluation command: recall@k and MRR over a JSONL file of labelled questions."""

from __future__ import annotations

import json
import math

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django_tenants.utils import tenant_context

from knowledge.services import knowledge_base_create
from tests.factories import ingest_text

pytestmark = pytest.mark.django_db

DOCUMENTS = {
    "Returns": "Items may be returned within 30 days of delivery for a full refund to the original card.",
    "Shipping": "Orders leave the Rotterdam warehouse within two working days; express delivery takes one day.",
    "Security": "Customer data is encrypted at rest with AES-256 and in transit with TLS 1.3.",
}


@pytest.fixture
def handbook(tenant_pair):
    with tenant_context(tenant_pair.a):
        knowledge_base = knowledge_base_create(name="eval")
        ids = {title: ingest_text(knowledge_base, title, text).pk for title, text in DOCUMENTS.items()}
    connection.set_schema_to_public()
    return knowledge_base, ids


def _write(tmp_path, rows) -> str:
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def test_reports_recall_and_mrr(tmp_path, capsys, handbook):
    knowledge_base, ids = handbook
    questions = _write(
        tmp_path,
        [
            {"question": "How long do I have to send something back?", "documents": ["returns"]},
            {"question": "When will my parcel leave the warehouse?", "documents": [ids["Shipping"]]},
            {"question": "Is my data encrypted?", "document": "Security"},
            # Mislabelled on purpose: the right answer is Shipping, so at k=1 this one is a miss.
            {"question": "How fast is express delivery?", "documents": ["Security"]},
        ],
    )

    call_command("knowledge_eval", "acme", str(knowledge_base.pk), questions, "-k", "1", "--json")
    report = json.loads(capsys.readouterr().out)

    assert report == {
        "k": 1,
        "questions": 4,
        "recall@1": 0.75,
        "mrr": 0.75,
        "ndcg@1": 0.75,
        "misses": ["How fast is express delivery?"],
    }


def test_recall_at_larger_k_finds_the_mislabelled_answer_lower_down(tmp_path, capsys, handbook):
    knowledge_base, _ = handbook
    questions = _write(tmp_path, [{"question": "How fast is express delivery?", "documents": ["Security"]}])

    call_command("knowledge_eval", "acme", str(knowledge_base.pk), questions, "-k", "3", "--json")
    report = json.loads(capsys.readouterr().out)

    assert report["recall@3"] == 1.0
    assert 0 < report["mrr"] < 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        pytest.param(["{not json"], "Line 1: not valid JSON", id="bad_json_case"),
        pytest.param([{"documents": ["Returns"]}], "Line 1: needs a non-empty string", id="no_question_case"),
        pytest.param([{"question": "q"}], "Line 1: needs 'documents'", id="no_documents_case"),
        pytest.param(
            ["", {"question": "q", "documents": ["Pricing"]}], "Line 2: no document 'Pricing'", id="unknown_title_case"
        ),
        pytest.param([""], "No questions to evaluate", id="empty_file_case"),
    ],
)
def test_bad_question_files_are_refused_with_the_line(tmp_path, handbook, rows, message):
    knowledge_base, _ = handbook

    with pytest.raises(CommandError, match=message):
        call_command("knowledge_eval", "acme", str(knowledge_base.pk), _write(tmp_path, rows))


def test_unknown_tenant_or_knowledge_base(tmp_path, handbook):
    questions = _write(tmp_path, [{"question": "q", "documents": ["Returns"]}])

    with pytest.raises(CommandError, match="tenant"):
        call_command("knowledge_eval", "nope", "1", questions)
    with pytest.raises(CommandError, match="No knowledge base"):
        call_command("knowledge_eval", "acme", "999999", questions)


def test_ndcg_and_recall_of_a_two_document_question():
    from knowledge.evaluation import EvaluationQuestion, question_result

    item = EvaluationQuestion(question="q", document_ids=frozenset({1, 2}), split="holdout")

    # Document 1 at rank 2 (and again at 3: gains once), document 2 missing from the top 4.
    result = question_result(item, [7, 1, 1, 9, 2], k=4)

    assert result.recall == 0.5
    assert result.reciprocal_rank == 0.5
    assert result.ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert result.retrieved_document_ids == [7, 1, 1, 9]


def test_per_question_output_split_and_mode(tmp_path, capsys, handbook):
    knowledge_base, _ = handbook
    questions = _write(
        tmp_path,
        [
            {"question": "How long do I have to send something back?", "documents": ["Returns"], "split": "tuning"},
            {"question": "Is my data encrypted at rest?", "documents": ["Security"], "split": "holdout"},
        ],
    )

    call_command(
        "knowledge_eval", "acme", str(knowledge_base.pk), questions,
        "-k", "2", "--split", "holdout", "--mode", "text", "--per-question", "--json",
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)

    assert report["questions"] == 1
    assert report["mrr"] == 1.0
    assert [row["question"] for row in report["per_question"]] == ["Is my data encrypted at rest?"]
    assert report["per_question"][0]["split"] == "holdout"
    assert report["per_question"][0]["ndcg"] == 1.0


def test_unknown_split_is_refused_with_the_line(tmp_path, handbook):
    knowledge_base, _ = handbook
    questions = _write(tmp_path, [{"question": "q", "documents": ["Returns"], "split": "train"}])

    with pytest.raises(CommandError, match="Line 1: 'split' must be one of tuning, holdout"):
        call_command("knowledge_eval", "acme", str(knowledge_base.pk), questions)
