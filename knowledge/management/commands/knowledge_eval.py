import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django_tenants.utils import tenant_context

from knowledge.evaluation import SPLITS, evaluation_questions_parse, knowledge_base_evaluate
from knowledge.selectors import knowledge_base_get
from tenants.errors import ParleyError
from tenants.selectors import tenant_get_by_slug


class Command(BaseCommand):
    help = (
        "Measure retrieval quality: recall@k, MRR and nDCG@k of a knowledge base over a JSONL file of questions, "
        'one per line: {"question": "...", "documents": [<document id or title>, ...], "split": "holdout"}.'
    )

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="tenant slug")
        parser.add_argument("knowledge_base", help="knowledge base id")
        parser.add_argument("questions", type=Path, help="JSONL file of questions")
        parser.add_argument("-k", type=int, default=10, help="how many chunks to retrieve per question (default 10)")
        parser.add_argument(
            "--mode",
            choices=("hybrid", "text", "vector"),
            default="hybrid",
            help="both lists fused (default), or the full-text (BM25F) or vector list alone",
        )
        parser.add_argument("--no-rerank", action="store_true", help="skip the knowledge base's reranker")
        parser.add_argument("--split", choices=SPLITS, help="only the questions of this half of the set")
        parser.add_argument("--per-question", action="store_true", help="every question's figures, not only misses")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def handle(self, *args, **options):
        if not 1 <= options["k"] <= 100:
            raise CommandError("-k must be between 1 and 100.")
        try:
            lines = options["questions"].read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"Cannot read {options['questions']}: {error}") from error
        try:
            tenant = tenant_get_by_slug(slug=options["tenant"])
            with tenant_context(tenant):
                knowledge_base = knowledge_base_get(knowledge_base_id=options["knowledge_base"])
                questions = evaluation_questions_parse(knowledge_base=knowledge_base, lines=lines)
                if options["split"]:
                    questions = [item for item in questions if item.split == options["split"]]
                    if not questions:
                        raise CommandError(f"No questions in the {options['split']} split.")
                report = knowledge_base_evaluate(
                    knowledge_base=knowledge_base,
                    questions=questions,
                    k=options["k"],
                    mode=options["mode"],
                    rerank=not options["no_rerank"],
                )
        except ParleyError as error:
            raise CommandError(error.message) from error
        summary = report.as_dict(per_question=options["per_question"])
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
            return
        k = report.k
        self.stdout.write(f"questions: {report.questions}")
        for name in (f"recall@{k}", "recall@5", "mrr", f"ndcg@{k}"):
            if name in summary:
                self.stdout.write(f"{name}: {summary[name]:.4f}")
        if options["per_question"]:
            self.stdout.write("recall  RR      nDCG    question")
            for row in summary["per_question"]:
                self.stdout.write(
                    f"{row['recall']:<7.2f} {row['reciprocal_rank']:<7.2f} {row['ndcg']:<7.2f} {row['question']}"
                )
            return
        for question in summary["misses"]:
            self.stdout.write(f"  missed: {question}")
