"""vLLM pools: route by scraped load, keep conversations on their replica, avoid dead replicas."""

from __future__ import annotations

import asyncio

import pytest

from chat.mock_server import MockServerHandle
from chat.providers.base import ChatRequest, Timeout, Unavailable, collect
from chat.providers.vllm_pool import ReplicaLoad, VllmPoolProvider, parse_vllm_metrics, rendezvous_weight

HELLO = [{"role": "user", "content": "Hello there"}]
IDLE = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage": 0.0}


def pool_of(servers: list[MockServerHandle], **options) -> VllmPoolProvider:
    options.setdefault("scrape_interval", 60.0)  # tests refresh by hand, so every routing decision is deterministic
    options.setdefault("timeout", 2.0)
    return VllmPoolProvider(endpoints=[server.url for server in servers], model="mock-model", **options)


def conversation_preferring(server: MockServerHandle, servers: list[MockServerHandle]) -> str:
    """A conversation id whose rendezvous hash puts it on ``server``."""
    for number in range(1000):
        conversation_id = f"conversation-{number}"
        if max(servers, key=lambda candidate: rendezvous_weight(conversation_id, candidate.url)) is server:
            return conversation_id
    raise AssertionError("no conversation id maps to the server")


async def ask(pool: VllmPoolProvider, conversation_id: str | None = None):
    return await collect(pool.stream(ChatRequest(messages=HELLO, conversation_id=conversation_id)))


async def ask_whole(pool: VllmPoolProvider, conversation_id: str | None = None):
    return await pool.complete(ChatRequest(messages=HELLO, conversation_id=conversation_id))


VLLM_PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# HELP KV_NAME KV-cache usage. 1 means 100 percent usage.
# TYPE KV_NAME gauge
KV_NAME{engine="0",model_name="m"} 0.25
KV_NAME{engine="1",model_name="m"} 0.5
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_count{model_name="m"} 0.0
"""


@pytest.mark.parametrize(
    "kv_name", ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"], ids=["kv_cache_case", "gpu_cache_case"]
)
def test_parses_vllm_load_gauges(kv_name):
    load = parse_vllm_metrics(VLLM_PAGE.replace("KV_NAME", kv_name))

    assert load == ReplicaLoad(running=5.0, waiting=1.0, kv_cache_usage=0.5)


def test_a_page_without_vllm_gauges_is_unreadable():
    with pytest.raises(ValueError, match="no vLLM load gauges"):
        parse_vllm_metrics("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n")


async def test_routes_to_the_less_loaded_replica(mock_llms):
    busy, idle = mock_llms[0], mock_llms[1]
    busy.configure(num_requests_running=10, num_requests_waiting=3, kv_cache_usage=0.8)
    idle.configure(num_requests_running=1, num_requests_waiting=0, kv_cache_usage=0.1)
    pool = pool_of([busy, idle])
    await pool.refresh()

    completions = [await ask(pool) for _ in range(5)]
    await pool.aclose()

    assert pool.replicas[0].load == ReplicaLoad(running=10.0, waiting=3.0, kv_cache_usage=0.8)
    assert [completion.usage.endpoint for completion in completions] == [idle.url] * 5
    assert busy.count() == 0
    assert idle.count() == 5
    assert completions[0].usage.provider == "vllm_pool"


async def test_spreads_requests_over_equally_loaded_replicas(mock_llms):
    for server in mock_llms:
        server.configure(**IDLE)
    pool = pool_of(mock_llms)
    await pool.refresh()

    for _ in range(6):
        await ask(pool)
    await pool.aclose()

    assert [server.count() for server in mock_llms] == [2, 2, 2]


@pytest.mark.parametrize("mode", ["stream", "complete"], ids=["stream_case", "complete_case"])
async def test_keeps_a_conversation_on_its_replica(mock_llms, mode):
    home, other = mock_llms[0], mock_llms[1]
    for server in (home, other):
        server.configure(**IDLE)
    pool = pool_of([home, other])
    await pool.refresh()
    conversation_id = conversation_preferring(home, [home, other])
    call = ask if mode == "stream" else ask_whole

    completions = [await call(pool, conversation_id) for _ in range(4)]
    await pool.aclose()

    assert {completion.usage.endpoint for completion in completions} == {home.url}
    assert home.count() == 4
    assert other.count() == 0


@pytest.mark.parametrize(
    "overload",
    [{"num_requests_waiting": 5}, {"kv_cache_usage": 0.97}, {"num_requests_running": 40}],
    ids=["waiting_case", "kv_cache_full_case", "much_busier_case"],
)
async def test_leaves_the_conversation_replica_when_it_is_overloaded(mock_llms, overload):
    home, other = mock_llms[0], mock_llms[1]
    home.configure(**{**IDLE, **overload})
    other.configure(**IDLE)
    pool = pool_of([home, other])
    await pool.refresh()

    completion = await ask(pool, conversation_preferring(home, [home, other]))
    await pool.aclose()

    assert completion.usage.endpoint == other.url
    assert home.count() == 0


async def test_stops_routing_to_a_replica_that_fails_health_checks_until_it_recovers(mock_llms):
    for server in mock_llms:
        server.configure(**IDLE)
    sick = mock_llms[2]
    sick.configure(is_healthy=False)
    pool = pool_of(mock_llms)
    await pool.refresh()

    for _ in range(6):
        await ask(pool)
    assert sick.count() == 0
    assert pool.replicas[2].is_healthy is False

    sick.configure(is_healthy=True)
    await pool.refresh()
    for _ in range(3):
        await ask(pool)
    await pool.aclose()

    assert sick.count() == 1


@pytest.mark.parametrize("mode", ["stream", "complete"], ids=["stream_case", "complete_case"])
async def test_a_failing_replica_is_retried_elsewhere_and_marked_dead(mock_llms, mode):
    broken, healthy = mock_llms[0], mock_llms[1]
    for server in (broken, healthy):
        server.configure(**IDLE)
    broken.configure(fault="500")
    pool = pool_of([broken, healthy], min_dead_seconds=60)
    await pool.refresh()
    conversation_id = conversation_preferring(broken, [broken, healthy])
    call = ask if mode == "stream" else ask_whole

    first = await call(pool, conversation_id)
    await pool.refresh()  # /health still passes, but a replica that just failed stays dead
    second = await call(pool, conversation_id)
    await pool.aclose()

    assert first.usage.endpoint == healthy.url
    assert second.usage.endpoint == healthy.url
    assert broken.count() == 1
    assert pool.replicas[0].is_healthy is False


async def test_a_timeout_is_not_retried_on_another_replica(mock_llms):
    hung, healthy = mock_llms[0], mock_llms[1]
    for server in (hung, healthy):
        server.configure(**IDLE)
    hung.configure(fault="hang", hang_seconds=5)
    pool = pool_of([hung, healthy], timeout=0.3)
    await pool.refresh()

    with pytest.raises(Timeout):
        await ask(pool, conversation_preferring(hung, [hung, healthy]))
    await pool.aclose()

    assert healthy.count() == 0
    assert pool.replicas[0].is_healthy is False


async def test_an_unreachable_endpoint_is_dead_after_one_scrape(mock_llm, refused_url):
    mock_llm.configure(**IDLE)
    pool = VllmPoolProvider(endpoints=[refused_url, mock_llm.url], model="mock-model", scrape_interval=60)

    await pool.refresh()
    completions = [await ask(pool) for _ in range(3)]
    await pool.aclose()

    assert pool.replicas[0].is_healthy is False
    assert {completion.usage.endpoint for completion in completions} == {mock_llm.url}


async def test_no_healthy_replica_is_unavailable(mock_llms):
    for server in mock_llms[:2]:
        server.configure(is_healthy=False)
    pool = pool_of(mock_llms[:2])
    await pool.refresh()

    with pytest.raises(Unavailable, match="No healthy replica"):
        await ask(pool)
    await pool.aclose()

    assert mock_llms[0].count() + mock_llms[1].count() == 0


async def test_the_scraper_polls_in_the_background_until_closed(mock_llm):
    pool = pool_of([mock_llm], scrape_interval=0.05)

    await ask(pool)
    await asyncio.sleep(0.5)  # ten intervals: at least three scrapes even on a busy machine
    await pool.aclose()
    await asyncio.sleep(0.05)  # a scrape cancelled in flight may still reach the server
    scrapes = mock_llm.count("metrics")
    await asyncio.sleep(0.2)

    assert scrapes >= 3
    assert mock_llm.count("health") >= 3
    assert mock_llm.count("metrics") == scrapes
