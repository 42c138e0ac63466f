"""The configuration epoch (tenants.config_epoch): what lets the hot paths cache configuration in
process memory and still apply every change from the next request."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django_tenants.utils import tenant_context

from billing.budgets import billing_policy_cached
from billing.models import Plan
from billing.services import tenant_billing_update, tenant_plan_change
from chat.services import bot_create, bot_delete, bot_update
from chat.snapshots import bot_snapshot_get
from knowledge.services import _bump_version, knowledge_base_create
from tenants.config_epoch import EPOCH_KEY, EpochCache, config_changed, epoch_sync
from tenants.redis import get_redis


def test_epoch_cache_serves_an_entry_only_in_its_epoch():
    cache = EpochCache(size=2)
    cache.put(b"e1", "a", 1)

    assert cache.get(b"e1", "a") == 1
    assert cache.get(b"e2", "a") is None
    cache.put(b"e2", "b", 2)  # a new epoch drops everything older
    assert cache.get(b"e1", "a") is None
    cache.put(b"e2", "c", 3)
    cache.put(b"e2", "d", 4)  # over its size: the least recently used goes
    assert (cache.get(b"e2", "b"), cache.get(b"e2", "c"), cache.get(b"e2", "d")) == (None, 3, 4)


def test_a_change_replaces_the_epoch_and_a_lost_epoch_is_never_reused(db):
    first = epoch_sync()
    config_changed()
    second = epoch_sync()
    get_redis().delete(EPOCH_KEY)  # Redis lost its data
    third = epoch_sync()

    assert len({first, second, third}) == 3
    assert epoch_sync() == third


def _snapshot(schema_name: str, public_id: str):
    return async_to_sync(bot_snapshot_get)(schema_name=schema_name, epoch=epoch_sync(), public_id=public_id)


def test_bot_snapshot_follows_every_change_of_the_bot_and_its_knowledge(tenant_pair, db):
    schema = tenant_pair.a.schema_name
    with tenant_context(tenant_pair.a):
        bot = bot_create(name="Snapshots", system_prompt="First.")
        kb = knowledge_base_create(name="snapshot-kb")
    before = _snapshot(schema, bot.public_id)

    with tenant_context(tenant_pair.a):
        bot_update(bot=bot, system_prompt="Second.", knowledge_bases=[kb.pk])
    after_update = _snapshot(schema, bot.public_id)
    with tenant_context(tenant_pair.a):
        _bump_version(kb.pk)  # a document ingested: an update(), which sends no signal
    after_ingest = _snapshot(schema, bot.public_id)
    with tenant_context(tenant_pair.a):
        bot_delete(bot=bot)
    after_delete = _snapshot(schema, bot.public_id)

    assert (before.system_prompt, before.knowledge) == ("First.", ())
    assert after_update.system_prompt == "Second."
    assert after_update.version == before.version + 1
    assert after_update.knowledge == ((kb.pk, kb.version),)
    assert after_ingest.knowledge == ((kb.pk, kb.version + 1),)
    assert after_delete is None
    # Another tenant never sees it, whatever the epoch.
    assert _snapshot(tenant_pair.b.schema_name, bot.public_id) is None


def test_billing_policy_cache_follows_a_plan_change(tenant_pair, db):
    tenant = tenant_pair.a
    small = Plan.objects.create(code="epoch-small", name="Small", requests_per_minute=7, tokens_per_minute=700)
    large = Plan.objects.create(code="epoch-large", name="Large", requests_per_minute=9, tokens_per_minute=900)

    def policy():
        return async_to_sync(billing_policy_cached)(tenant=tenant, api_key_id=None, end_user="", epoch=epoch_sync())

    tenant_plan_change(tenant=tenant, plan=small)
    first = policy()
    assert policy() is first  # served from memory while nothing changes
    tenant_plan_change(tenant=tenant, plan=large)

    assert (first.requests_per_minute, policy().requests_per_minute) == (7, 9)


def test_cached_billing_policy_puts_each_end_user_in_their_own_budget(tenant_pair, db):
    tenant = tenant_pair.a
    tenant_billing_update(tenant=tenant, end_user_monthly_tokens=5_000)

    def budgets(end_user: str):
        policy = async_to_sync(billing_policy_cached)(
            tenant=tenant, api_key_id=None, end_user=end_user, epoch=epoch_sync()
        )
        return [(limit.level, limit.identity, limit.monthly_tokens) for limit in policy.budgets]

    alice, bob, nobody = budgets("key:1:alice"), budgets("key:1:bob"), budgets("")

    assert ("end_user", "key:1:alice", 5_000) in alice
    assert ("end_user", "key:1:bob", 5_000) in bob
    assert not [limit for limit in nobody if limit[0] == "end_user"]
    assert alice == [*nobody, ("end_user", "key:1:alice", 5_000)]


def test_a_configuration_change_is_refused_whole_while_redis_is_unreachable(client, tenant_pair, db, monkeypatch):
    """Saved without a new epoch, a change would stay invisible to every replica that cached the
    old configuration: the write is refused with a 503 and rolled back, and nothing is lost."""
    import redis

    from chat.models import Bot
    from tenants import config_epoch
    from tests.factories import bearer, make_api_key

    _key, raw = make_api_key(tenant_pair.a)
    created = client.post("/api/v1/bots/", {"name": "Support"}, content_type="application/json", **bearer(raw))
    bot_id = created.json()["id"]
    epoch = get_redis().get(EPOCH_KEY)
    # The epoch's writes go to a Redis that refuses connections (requests still authenticate).
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    monkeypatch.setattr(config_epoch, "get_redis", lambda: unreachable)

    renamed = client.patch(
        f"/api/v1/bots/{bot_id}/", {"name": "Renamed"}, content_type="application/json", **bearer(raw)
    )
    another = client.post("/api/v1/bots/", {"name": "Another"}, content_type="application/json", **bearer(raw))

    assert created.status_code == 201
    assert renamed.status_code == another.status_code == 503
    assert renamed.json()["error"]["code"] == "config_store_unavailable"
    assert "nothing was changed" in renamed.json()["error"]["message"]
    with tenant_context(tenant_pair.a):
        assert list(Bot.objects.filter(name__in=["Support", "Renamed", "Another"]).values_list("name", flat=True)) == [
            "Support"
        ]
    assert get_redis().get(EPOCH_KEY) == epoch
