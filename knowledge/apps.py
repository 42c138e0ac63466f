from django.apps import AppConfig


class KnowledgeConfig(AppConfig):
    name = "knowledge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from knowledge.models import KnowledgeBase
        from tenants.config_epoch import config_models_watch

        # A knowledge base's version is part of a bot's snapshot (chat.snapshots): cached answers key on it.
        config_models_watch(KnowledgeBase)
