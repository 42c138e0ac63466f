"""Admin-site pages of the chat app: bots (list, create, edit, delete, embed snippet, preview chat)
and conversations (filtered list, transcripts). Thin: parse a form, call a service, render."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone

from chat import selectors, services, widget
from chat.models import Bot, Conversation, Message
from chat.selectors import dashboard_stats
from chat.services import MASKED_SECRET, route_masked, route_secrets_restored
from knowledge.models import KnowledgeBase
from tenants.errors import ValidationFailed
from tenants.views import chart, form_error, site_page

CONVERSATIONS_PER_PAGE = 25
TRANSCRIPT_MAX_MESSAGES = 1000


# --- bots ---------------------------------------------------------------------------------------


class BotForm(forms.Form):
    name = forms.CharField(max_length=200)
    system_prompt = forms.CharField(
        required=False,
        max_length=20_000,
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text="Instructions the model follows in every conversation.",
    )
    provider_route = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "class": "code", "spellcheck": "false"}),
        help_text='JSON: {"targets": [{"kind": "local"}]}; targets are tried in order. '
        f"Stored API keys show as {MASKED_SECRET}; leave them so to keep them.",
    )
    temperature = forms.FloatField(min_value=0, max_value=2, help_text="0 to 2")
    top_p = forms.FloatField(min_value=0, max_value=1, help_text="0 to 1")
    max_tokens = forms.IntegerField(min_value=1, max_value=32_768, help_text="Longest answer, in tokens")
    history_strategy = forms.ChoiceField(choices=Bot.HistoryStrategy.choices)
    history_window = forms.IntegerField(min_value=1, max_value=200, help_text="Turns kept by the sliding window")
    knowledge_bases = forms.ModelMultipleChoiceField(
        queryset=KnowledgeBase.objects.none(), required=False, widget=forms.CheckboxSelectMultiple
    )
    allowed_origins = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "class": "code", "spellcheck": "false"}),
        help_text="One origin per line, like https://www.example.com. Empty: the widget works nowhere.",
    )
    allow_any_origin = forms.BooleanField(required=False, label="Allow the widget on any site")
    greeting = forms.CharField(required=False, max_length=500, help_text="The widget's first message.")
    primary_color = forms.RegexField(regex=r"^#[0-9a-fA-F]{6}$", widget=forms.TextInput(attrs={"type": "color"}))
    text_color = forms.RegexField(regex=r"^#[0-9a-fA-F]{6}$", widget=forms.TextInput(attrs={"type": "color"}))
    position = forms.ChoiceField(choices=[("right", "Bottom right"), ("left", "Bottom left")])

    # Service error params → form fields.
    PARAMS = {
        "generation.temperature": "temperature",
        "generation.top_p": "top_p",
        "generation.max_tokens": "max_tokens",
        "generation": "temperature",
        "theme": "primary_color",
    }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["knowledge_bases"]
        assert isinstance(field, forms.ModelChoiceField)  # (self.fields holds copies of the fields declared above)
        field.queryset = KnowledgeBase.objects.order_by("name")

    def clean_provider_route(self) -> dict:
        text = self.cleaned_data["provider_route"]
        try:
            route = json.loads(text)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(
                f"Not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
            ) from None
        if not isinstance(route, dict):
            raise forms.ValidationError('Must be a JSON object like {"targets": [{"kind": "local"}]}.')
        return route

    def clean_allowed_origins(self) -> list[str]:
        return [line.strip() for line in self.cleaned_data["allowed_origins"].splitlines() if line.strip()]

    @classmethod
    def initial_for(cls, bot: Bot | None) -> dict:
        if bot is None:
            from chat.models import default_generation, default_provider_route, default_theme

            route, generation, theme = default_provider_route(), default_generation(), default_theme()
            return {
                "provider_route": json.dumps(route, indent=2),
                **{key: generation[key] for key in ("temperature", "top_p", "max_tokens")},
                "history_strategy": Bot.HistoryStrategy.WINDOW,
                "history_window": 10,
                **theme,
            }
        theme = {"primary_color": "#3457d5", "text_color": "#ffffff", "position": "right", **(bot.theme or {})}
        return {
            "name": bot.name,
            "system_prompt": bot.system_prompt,
            "provider_route": json.dumps(route_masked(bot.provider_route), indent=2),
            "temperature": bot.generation.get("temperature"),
            "top_p": bot.generation.get("top_p"),
            "max_tokens": bot.generation.get("max_tokens"),
            "history_strategy": bot.history_strategy,
            "history_window": bot.history_window,
            "knowledge_bases": list(bot.knowledge_bases.all()),
            "allowed_origins": "\n".join(bot.allowed_origins),
            "allow_any_origin": bot.allow_any_origin,
            "greeting": bot.greeting,
            "primary_color": theme["primary_color"],
            "text_color": theme["text_color"],
            "position": theme["position"],
        }

    def changes(self, bot: Bot | None) -> dict:
        """The services' keyword arguments from the cleaned form, merged over what the bot has."""
        data = self.cleaned_data
        generation = dict(bot.generation) if bot is not None else {}
        generation.update(temperature=data["temperature"], top_p=data["top_p"], max_tokens=data["max_tokens"])
        theme = dict(bot.theme or {}) if bot is not None else {}
        theme.update(primary_color=data["primary_color"], text_color=data["text_color"], position=data["position"])
        return {
            "name": data["name"],
            "system_prompt": data["system_prompt"],
            "provider_route": route_secrets_restored(data["provider_route"], bot.provider_route if bot else None),
            "generation": generation,
            "history_strategy": data["history_strategy"],
            "history_window": data["history_window"],
            "knowledge_bases": [kb.pk for kb in data["knowledge_bases"]],
            "allowed_origins": data["allowed_origins"],
            "allow_any_origin": data["allow_any_origin"],
            "greeting": data["greeting"],
            "theme": theme,
        }


@site_page()
def bot_list(request: HttpRequest) -> HttpResponse:
    bots = selectors.bot_list().prefetch_related("knowledge_bases")
    return render(request, "site/bots/list.html", {"bots": bots, "nav": "bots"})


def _save_bot(request: HttpRequest, bot: Bot | None) -> HttpResponse:
    form = BotForm(request.POST or None, initial=BotForm.initial_for(bot))
    if request.method == "POST" and form.is_valid():
        try:
            if bot is None:
                bot = services.bot_create(**form.changes(None))
                messages.success(request, f"Bot “{bot.name}” created.")
            else:
                bot = services.bot_update(bot=bot, **form.changes(bot))
                messages.success(request, "Changes saved.")
        except ValidationFailed as error:
            form_error(form, error, BotForm.PARAMS)
        else:
            return redirect("site-bot", public_id=bot.public_id)
    status = 400 if form.errors else 200
    return render(request, "site/bots/form.html", {"form": form, "bot": bot, "nav": "bots"}, status=status)


@site_page(admin=True)
def bot_create(request: HttpRequest) -> HttpResponse:
    return _save_bot(request, None)


@site_page(admin=True)
def bot_edit(request: HttpRequest, public_id: str) -> HttpResponse:
    return _save_bot(request, selectors.bot_get(public_id=public_id))


def _bot_detail_context(request: HttpRequest, bot: Bot) -> dict:
    membership = getattr(request, "membership", None)  # site_page sets it
    is_admin = membership is not None and membership.is_admin
    base = request.build_absolute_uri("/").rstrip("/")
    static = settings.STATIC_URL.strip("/")
    snippet = f'<script src="{base}/{static}/widget/parley.js" data-bot="{bot.public_id}" async></script>'
    return {
        "bot": bot,
        "snippet": snippet,
        "knowledge_bases": list(bot.knowledge_bases.all()),
        # Admins only (the template shows it to them alone): the route names the model servers.
        "route_json": json.dumps(route_masked(bot.provider_route), indent=2) if is_admin else "",
        "nav": "bots",
    }


@site_page()
def bot_detail(request: HttpRequest, public_id: str) -> HttpResponse:
    bot = selectors.bot_get(public_id=public_id)
    return render(request, "site/bots/detail.html", _bot_detail_context(request, bot))


@site_page(admin=True)
def bot_delete(request: HttpRequest, public_id: str) -> HttpResponse:
    bot = selectors.bot_get(public_id=public_id)
    if request.method == "POST":
        services.bot_delete(bot=bot)
        messages.success(request, f"Bot “{bot.name}” deleted.")
        return redirect("site-bots")
    conversations = bot.conversations.count()
    return render(request, "site/bots/delete.html", {"bot": bot, "conversation_count": conversations, "nav": "bots"})


@site_page(admin=True)
def bot_identity_secret_rotate(request: HttpRequest, public_id: str) -> HttpResponse:
    """A new identity-verification secret, shown in this response only (like an API key); the old
    one stops verifying at once. POST only."""
    bot = selectors.bot_get(public_id=public_id)
    if request.method != "POST":
        return redirect("site-bot", public_id=bot.public_id)
    secret = widget.bot_identity_secret_rotate(bot=bot)
    messages.success(request, "Identity verification is on with a new secret: the previous one no longer verifies.")
    context = _bot_detail_context(request, bot)
    context["new_identity_secret"] = secret
    return render(request, "site/bots/detail.html", context)


# --- dashboard ----------------------------------------------------------------------------------

DASHBOARD_PERIODS = (7, 30, 90)


@site_page()
def dashboard(request: HttpRequest) -> HttpResponse:
    """The admin site's home page: the tenant's conversations, messages, tokens, cache and latency per day."""
    try:
        period = int(request.GET.get("days", 7))
    except ValueError:
        period = 7
    if period not in DASHBOARD_PERIODS:
        period = 7
    date_to = timezone.now().astimezone(UTC).date()
    date_from = date_to - timedelta(days=period - 1)
    stats = dashboard_stats(date_from=date_from, date_to=date_to)
    days = [row["day"] for row in stats.days]

    def column(name: str) -> list:
        return [row[name] for row in stats.days]

    hit_rates = [round(100 * row["cached"] / row["answers"], 1) if row["answers"] else None for row in stats.days]
    charts = [
        chart(title="Conversations per day", days=days, series=[("Conversations", column("conversations"))]),
        chart(title="Messages per day", days=days, series=[("Messages", column("messages"))]),
        chart(
            title="Tokens per day",
            days=days,
            series=[("Tokens", [row["tokens_in"] + row["tokens_out"] for row in stats.days])],
        ),
        chart(title="Cache hit rate (%)", days=days, series=[("Hit rate %", hit_rates)], kind="line"),
        chart(
            title="Time to first token (ms)",
            days=days,
            series=[
                ("p50", [None if v is None else round(v) for v in column("ttft_p50")]),
                ("p95", [None if v is None else round(v) for v in column("ttft_p95")]),
            ],
            kind="line",
        ),
        chart(title="Errors per day", days=days, series=[("Errors", column("errors"))]),
    ]
    return render(
        request,
        "site/dashboard.html",
        {
            "period": period,
            "periods": DASHBOARD_PERIODS,
            "date_from": date_from,
            "date_to": date_to,
            "totals": stats.totals,
            "charts": charts,
            "nav": "dashboard",
        },
    )


# --- conversations ------------------------------------------------------------------------------


class ConversationFilterForm(forms.Form):
    bot = forms.ModelChoiceField(queryset=Bot.objects.none(), required=False, empty_label="All bots")
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    kind = forms.ChoiceField(
        choices=[("", "Any end user"), *Conversation.EndUserKind.choices], required=False, label="End user"
    )
    negative = forms.BooleanField(required=False, label="Has negative feedback")
    cached = forms.BooleanField(required=False, label="Has cached answers")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["bot"]
        assert isinstance(field, forms.ModelChoiceField)  # (self.fields holds copies of the fields declared above)
        field.queryset = Bot.objects.order_by("name")

    def filters(self) -> selectors.ConversationFilters:
        data = self.cleaned_data if self.is_valid() else {}
        bot = data.get("bot")
        return selectors.ConversationFilters(
            bot_id=bot.pk if bot else None,
            date_from=data.get("date_from"),
            date_to=data.get("date_to"),
            end_user_kind=data.get("kind") or "",
            has_negative_feedback=bool(data.get("negative")),
            is_cached=bool(data.get("cached")),
        )


@site_page(admin=True)
def conversation_list(request: HttpRequest) -> HttpResponse:
    form = ConversationFilterForm(request.GET or None)
    conversations = selectors.conversation_search(filters=form.filters())
    page = Paginator(conversations, CONVERSATIONS_PER_PAGE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "site/conversations/list.html",
        {"form": form, "page": page, "query": query.urlencode(), "nav": "conversations"},
    )


@site_page(admin=True)
def conversation_detail(request: HttpRequest, conversation_id: str) -> HttpResponse:
    conversation = selectors.conversation_get_for_admin(conversation_id=conversation_id)
    transcript = selectors.message_list(conversation=conversation, limit=TRANSCRIPT_MAX_MESSAGES)
    answers = [message for message in transcript if message.role == Message.Role.ASSISTANT]
    return render(
        request,
        "site/conversations/detail.html",
        {
            "conversation": conversation,
            "transcript": transcript,
            "answer_count": len(answers),
            "cached_count": sum(1 for message in answers if message.is_cached),
            "back": reverse("site-conversations"),
            "nav": "conversations",
        },
    )
