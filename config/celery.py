"""The Celery app. Tasks carry the tenant schema in their headers (tenant-schemas-celery) and the
worker switches to it before running them, and back after. Task log lines carry the request id
of the request that queued them (django-structlog) and the tenant."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import structlog
from django.dispatch import receiver
from django_structlog.celery import signals as structlog_signals
from django_structlog.celery.steps import DjangoStructLogInitStep
from tenant_schemas_celery.app import CeleryApp, get_schema_name_from_task

app = CeleryApp("parley")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.steps["worker"].add(DjangoStructLogInitStep)
app.autodiscover_tasks()


@receiver(structlog_signals.bind_extra_task_metadata)
def _bind_tenant(sender, signal, task=None, logger=None, **kwargs):
    structlog.contextvars.bind_contextvars(tenant=get_schema_name_from_task(task, {}) or "public")
