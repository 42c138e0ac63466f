import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django_tenants.utils import tenant_context

from knowledge.evaluation import evaluation_questions_parse, knowledge_base_evaluate
from knowledge.selectors import knowledge_base_get
from tenants.errors import ParleyError
from tenants.selectors import tenant_get_by_slug


class Command(BaseCommand):
    help = (
        "Measure retrieval quality: recall@k and MRR of a knowledge base over a JSONL file of questions, "
        'one per line: {"question": "...", "documents": [<document id or title>, ...]}.'
    )

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="tenant slug")
        parser.add_argument("knowledge_base", help="knowledge base id")
        parser.add_argument("questions", type=Path, help="JSONL file of questions")
        parser.add_argument("-k", type=int, default=10, help="how many chunks to retrieve per question (default 10)")
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
                report = knowledge_base_evaluate(knowledge_base=knowledge_base, questions=questions, k=options["k"])
        except ParleyError as error:
            raise CommandError(error.message) from error
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
            return
        summary = report.as_dict()
        self.stdout.write(f"questions: {report.questions}")
        self.stdout.write(f"recall@{report.k}: {summary[f'recall@{report.k}']:.4f}")
        self.stdout.write(f"MRR: {summary['mrr']:.4f}")
        for question in summary["misses"]:
            self.stdout.write(f"  missed: {question}")
