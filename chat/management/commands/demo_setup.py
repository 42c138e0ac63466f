"""Idempotently create the demo tenant, its owner and an all-scopes API key; print them and
write them to var/demo.json for scripts. Development only."""

import json
import secrets
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django_tenants.utils import tenant_context

from tenants.models import ApiKey, Tenant, User
from tenants.resolution import api_key_resolve
from tenants.services import (
    api_key_create,
    api_key_parse_prefix,
    membership_set,
    tenant_create,
    user_create,
)

DEMO_SLUG = "demo"
DEMO_EMAIL = "owner@demo.parley.local"


KNOWLEDGE_FILE = Path(__file__).with_name("demo_knowledge.md")


class Command(BaseCommand):
    help = "Create (or reuse) the demo tenant, owner login and API key; write var/demo.json."

    def add_arguments(self, parser):
        parser.add_argument("--port", default="8000")

    def handle(self, *args, **options):
        if settings.IS_PRODUCTION:
            raise CommandError("demo_setup is for development only.")
        path = settings.BASE_DIR / "var" / "demo.json"
        previous = json.loads(path.read_text()) if path.exists() else {}

        user = User.objects.filter(email=DEMO_EMAIL).first()
        password = previous.get("password") or secrets.token_urlsafe(12)
        if user is None:
            user = user_create(email=DEMO_EMAIL, password=password, full_name="Demo Owner")
        elif not user.check_password(password):
            user.set_password(password)
            user.save(update_fields=["password"])
        tenant = Tenant.objects.filter(slug=DEMO_SLUG).first()
        if tenant is None:
            tenant = tenant_create(name="Demo Company", slug=DEMO_SLUG, owner=user)
        membership_set(user=user, tenant=tenant, role="owner")

        api_key = previous.get("api_key", "")
        record = api_key_resolve(api_key_parse_prefix(api_key) or "") if api_key else None
        if record is None or record.is_revoked or record.tenant.pk != tenant.pk:
            api_key = api_key_create(
                tenant=tenant, name="Demo key (make run)", scopes=list(ApiKey.Scope.values)
            ).raw_key

        bot_public_id = self._demo_bot(tenant, previous.get("bot_public_id"))

        port = options["port"]
        base_url = f"http://127.0.0.1:{port}"
        demo = {
            **previous,
            "base_url": base_url,
            "tenant_url": f"http://{DEMO_SLUG}.{settings.PARLEY_BASE_DOMAIN}:{port}",
            "admin_url": f"http://{DEMO_SLUG}.{settings.PARLEY_BASE_DOMAIN}:{port}/accounts/login/",
            "operator_admin_url": f"http://{settings.PARLEY_BASE_DOMAIN}:{port}/admin/",
            "api_docs_url": f"{base_url}/api/docs/",
            "email": DEMO_EMAIL,
            "password": password,
            "api_key": api_key,
            "bot_public_id": bot_public_id,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(demo, indent=2) + "\n")
        path.chmod(0o600)
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "Parley is starting.",
                    f"  Admin site : {demo['admin_url']}",
                    f"  API        : {base_url}  (any host; the API key selects the tenant)",
                    f"  API docs   : {demo['api_docs_url']}",
                    f"  Login      : {DEMO_EMAIL} / {password}",
                    f"  API key    : {api_key}",
                    f"  Demo bot   : {bot_public_id}",
                    f"  Try it     : curl -H 'Authorization: Bearer {api_key}' {base_url}/v1/models",
                    f"               curl -N {base_url}/v1/chat/completions -H 'Authorization: Bearer {api_key}' "
                    f'-H \'Content-Type: application/json\' -d \'{{"model": "{bot_public_id}", "stream": true, '
                    f'"messages": [{{"role": "user", "content": "How do API keys work?"}}]}}\'',
                    f"  (also in {path})",
                    "",
                ]
            )
        )

    def _demo_bot(self, tenant, previous_public_id: str | None) -> str:
        from chat.models import Bot
        from chat.services import bot_create
        from knowledge.services import document_create_from_text, document_ingest, knowledge_base_create

        with tenant_context(tenant):
            bot = Bot.objects.filter(public_id=previous_public_id).first() if previous_public_id else None
            if bot is None:
                bot = Bot.objects.filter(name="Parley Guide").first()
            if bot is None:
                knowledge_base = knowledge_base_create(name="Parley handbook")
                for section in KNOWLEDGE_FILE.read_text().split("\n# ")[0:]:
                    title, _, body = section.lstrip("# ").partition("\n")
                    document = document_create_from_text(knowledge_base=knowledge_base, title=title.strip(), text=body)
                    # Ingested here rather than by the worker, so the demo answers from its first minute.
                    document_ingest(document_id=document.pk, ingestion_id=str(document.ingestion_id))
                bot = bot_create(
                    name="Parley Guide",
                    system_prompt="You answer questions about Parley from its handbook.",
                    knowledge_bases=[knowledge_base.pk],
                    greeting="Hi! Ask me anything about Parley.",
                    allowed_origins=["http://localhost:8000", "http://127.0.0.1:8000"],
                )
            return bot.public_id
