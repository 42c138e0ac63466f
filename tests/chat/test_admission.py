"""Admission on the chat endpoints: rate limits (429) and budgets (402) refuse a turn before
anything is stored; admitted turns carry rate-limit headers and a ticket for the worker."""

from __future__ import annotations

import json

import pytest
from django_tenants.utils import tenant_context

from billing.models import ApiKeyBudget
from chat.models import Conversation, Message
from chat.services import bot_create
from tenants.redis import get_redis
from tests.factories import bearer, make_api_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def bot(tenant_pair):
    with tenant_context(tenant_pair.a):
        return bot_create(name="Gate")


def _complete(client, bot, key, **extra):
    body = {"model": bot.public_id, "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post("/v1/chat/completions", body, content_type="application/json", **bearer(key))


def _stored(tenant) -> tuple[int, int]:
    with tenant_context(tenant):
        return Conversation.objects.count(), Message.objects.count()


def test_requests_over_the_key_limit_get_429_and_store_nothing(client, tenant_pair, bot):
    api_key, raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(api_key=api_key, requests_per_minute=2)

    admitted = [_complete(client, bot, raw) for _ in range(2)]
    before = _stored(tenant_pair.a)
    refused = _complete(client, bot, raw)

    assert [response.status_code for response in admitted] == [200, 200]
    assert admitted[0]["x-ratelimit-limit-requests"] == "2"
    assert admitted[1]["x-ratelimit-remaining-requests"] == "0"
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "this API key" in refused.json()["error"]["message"]
    assert int(refused["Retry-After"]) >= 1
    assert _stored(tenant_pair.a) == before


def test_an_exhausted_key_budget_gets_402_and_stores_nothing(client, tenant_pair, bot):
    api_key, raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(api_key=api_key, monthly_token_budget=100)
    before = _stored(tenant_pair.a)

    response = _complete(client, bot, raw)

    assert response.status_code == 402
    assert response.json()["error"]["type"] == "insufficient_quota"
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert _stored(tenant_pair.a) == before


def test_end_users_of_one_key_are_limited_separately(client, tenant_pair, bot, settings):
    settings.PARLEY_END_USER_REQUESTS_PER_MINUTE = 1
    _, raw = make_api_key(tenant_pair.a)

    alice = [_complete(client, bot, raw, user="alice").status_code for _ in range(2)]
    bob = _complete(client, bot, raw, user="bob").status_code
    anonymous = [_complete(client, bot, raw).status_code for _ in range(2)]  # the key itself: key limits only

    assert alice == [200, 429]
    assert bob == 200
    assert anonymous == [200, 200]


def test_admitted_turn_carries_a_budget_ticket_to_the_worker(client, tenant_pair, bot):
    api_key, raw = make_api_key(tenant_pair.a)

    response = _complete(client, bot, raw, max_tokens=50)

    (entry,) = get_redis().xrange("parley:generation:jobs")
    job = json.loads(entry[1][b"job"])
    ticket = job["gateway"]
    assert response.status_code == 200
    assert ticket["api_key_id"] == api_key.pk
    assert ticket["end_user"] == f"key:{api_key.pk}"
    assert ticket["bot"] == bot.public_id
    assert ticket["reservation"]["tokens"] == ticket["estimate"] > 50


def test_admission_reads_plan_key_overrides_and_budgets_once_per_configuration_epoch(
    tenant_pair, bot, django_assert_num_queries
):
    api_key, _raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(api_key=api_key, requests_per_minute=7, monthly_token_budget=50_000)
    caller = _key_caller(tenant_pair.a, bot, api_key)

    _admit(caller)  # the policy is read once per epoch, and the month's counters start from the database

    with django_assert_num_queries(0):
        admission = _admit(caller)

    assert admission.headers["x-ratelimit-limit-requests"] == "7"
    assert admission.headers["x-ratelimit-remaining-requests"] == "5"
    assert [level[0] for level in admission.ticket["reservation"]["levels"]] == ["tenant", "key"]


# --- admission: rate limits and the budget in one round trip -------------------------------------


def _admit(caller, **kwargs):
    """What the door does (chat.turn_core): prepare, queue on a pipeline, finish from its replies."""
    from asgiref.sync import async_to_sync

    from chat.admission import admission_prepare
    from tenants.config_epoch import epoch_sync
    from tenants.redis import REDIS_UNAVAILABLE, get_loop_redis

    async def admit():
        queued = await admission_prepare(caller=caller, prompt_chars=40, max_tokens=100, epoch=epoch_sync(), **kwargs)
        try:
            async with get_loop_redis().pipeline(transaction=False) as pipe:
                queued.queue(pipe)
                replies = await pipe.execute(raise_on_error=False)
        except REDIS_UNAVAILABLE:
            replies = None
        return await queued.finish(replies)

    return async_to_sync(admit)()


def _key_caller(tenant, bot, api_key):
    from chat.admission import Caller

    return Caller(
        tenant=tenant,
        bot_id=bot.pk,
        bot_public_id=bot.public_id,
        bot_rate_limits=bot.rate_limits or {},
        api_key_id=api_key.pk,
        end_user=f"key:{api_key.pk}",
        is_end_user_limited=False,
    )


def _key_budget_used(tenant, api_key) -> int | None:
    from billing.budgets import budget_used

    return budget_used(tenant_schema=tenant.schema_name, level="key", identity=str(api_key.pk))


def test_admission_refused_by_a_rate_limit_gives_its_budget_reservation_back(tenant_pair, bot):
    from billing.ratelimit import RateLimited

    api_key, _raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(api_key=api_key, requests_per_minute=1, monthly_token_budget=50_000)
    caller = _key_caller(tenant_pair.a, bot, api_key)

    admission = _admit(caller)
    reserved = _key_budget_used(tenant_pair.a, api_key)
    with pytest.raises(RateLimited):
        _admit(caller)

    assert reserved == admission.ticket["estimate"] > 0
    assert _key_budget_used(tenant_pair.a, api_key) == reserved  # the refused request's reservation went back


def test_admission_refused_by_the_budget_gives_its_per_minute_tokens_back(tenant_pair, bot):
    from billing.budgets import BudgetExceeded

    api_key, _raw = make_api_key(tenant_pair.a)
    # Room for one request's estimate (110 tokens) a minute: a second one fits only if the first,
    # refused by the budget, gave its tokens back.
    ApiKeyBudget.objects.create(api_key=api_key, tokens_per_minute=150, monthly_token_budget=10)
    caller = _key_caller(tenant_pair.a, bot, api_key)

    with pytest.raises(BudgetExceeded):
        _admit(caller)
    with pytest.raises(BudgetExceeded):  # not RateLimited
        _admit(caller)

    assert _key_budget_used(tenant_pair.a, api_key) == 0


def test_admission_loads_the_scripts_again_after_redis_lost_them(tenant_pair, bot):
    api_key, _raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(api_key=api_key, requests_per_minute=5, monthly_token_budget=50_000)
    caller = _key_caller(tenant_pair.a, bot, api_key)
    _admit(caller)
    get_redis().script_flush()

    admission = _admit(caller)

    assert admission.headers["x-ratelimit-remaining-requests"] == "3"
    assert _key_budget_used(tenant_pair.a, api_key) == 2 * admission.ticket["estimate"]


def test_admission_keeps_refusing_over_the_limit_when_its_pipeline_cannot_run(tenant_pair, bot, monkeypatch):
    """The one-round-trip pipeline failing (a connection error) falls back to the checks one at a
    time: a request over its limit is still refused there."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import ConnectionError as RedisConnectionError

    from billing.ratelimit import RateLimited

    api_key, _raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(api_key=api_key, requests_per_minute=1, monthly_token_budget=50_000)
    caller = _key_caller(tenant_pair.a, bot, api_key)
    _admit(caller)

    async def unreachable(self, raise_on_error=True):
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(Pipeline, "execute", unreachable)
    with pytest.raises(RateLimited):
        _admit(caller)


def test_an_admission_undone_gives_back_its_request_its_tokens_and_its_reservation(tenant_pair, bot):
    """The edge undoes an admission whose API key turned out changed. With room for two requests
    (and two estimates of 110 tokens) a minute, a third admission passes only if the undone one
    gave everything back."""
    from asgiref.sync import async_to_sync

    from chat.admission import admission_prepare
    from tenants.config_epoch import epoch_sync
    from tenants.redis import get_loop_redis

    api_key, _raw = make_api_key(tenant_pair.a)
    ApiKeyBudget.objects.create(
        api_key=api_key, requests_per_minute=2, tokens_per_minute=250, monthly_token_budget=50_000
    )
    caller = _key_caller(tenant_pair.a, bot, api_key)
    first = _admit(caller)  # also loads the scripts and the month's budget counters
    estimate = first.ticket["estimate"]

    async def admit_then_undo():
        queued = await admission_prepare(caller=caller, prompt_chars=40, max_tokens=100, epoch=epoch_sync())
        async with get_loop_redis().pipeline(transaction=False) as pipe:
            pipe.ping()  # the edge's own commands come first: the admission's replies follow them
            queued.queue(pipe)
            replies = await pipe.execute(raise_on_error=False)
        assert replies[1][0] == 1  # admitted…
        assert _key_budget_used(tenant_pair.a, api_key) == 2 * estimate
        await queued.undo(replies)  # …and given back

    async_to_sync(admit_then_undo)()
    assert _key_budget_used(tenant_pair.a, api_key) == estimate

    admission = _admit(caller)  # RateLimited here if the request or its tokens were kept
    assert admission.headers["x-ratelimit-remaining-requests"] == "0"
    assert _key_budget_used(tenant_pair.a, api_key) == 2 * estimate
