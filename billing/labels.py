"""Names for what billing meters: usage records carry ids (a bot's public id), and the app that
owns those objects tells billing how to name them, so billing never asks a feature app.

``chat`` registers its bots' names when it starts (chat.apps); without a registration the ids
themselves are shown.
"""

from __future__ import annotations

from collections.abc import Callable

BotLabels = Callable[[], dict[str, str]]  # public id → name, in the active tenant's schema

_bot_labels: BotLabels | None = None


def bot_labels_register(source: BotLabels) -> None:
    global _bot_labels
    _bot_labels = source


def bot_labels() -> dict[str, str]:
    return _bot_labels() if _bot_labels is not None else {}
