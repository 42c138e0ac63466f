"""The Celery app. Tasks carry the tenant schema in their headers (tenant-schemas-celery) and the
worker switches to it before running them, and back after."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from tenant_schemas_celery.app import CeleryApp

app = CeleryApp("parley")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
