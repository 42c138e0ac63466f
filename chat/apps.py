from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from billing.labels import bot_labels_register
        from chat.models import Bot
        from tenants.config_epoch import config_models_watch

        # The edge and the generation workers cache bots per configuration epoch (chat.snapshots).
        config_models_watch(Bot, m2m_through=[Bot.knowledge_bases.through])
        # Billing's usage pages name bots by what chat tells it (billing never imports chat).
        bot_labels_register(lambda: dict(Bot.objects.values_list("public_id", "name")))
