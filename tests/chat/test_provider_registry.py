"""Routes from configuration: validation that names the bad field, construction, per-loop reuse."""

from __future__ import annotations

import pytest

from chat.providers.base import ChatRequest, collect
from chat.providers.circuit import RedisCircuitStore
from chat.providers.local import LocalProvider
from chat.providers.openai_compat import AiohttpOpenAICompatProvider, OpenAICompatProvider
from chat.providers.registry import build_route, route_from_config, routes_close, validate_route_config
from chat.providers.vllm_pool import VllmPoolProvider
from tenants.errors import ValidationFailed

HELLO = [{"role": "user", "content": "Hello there"}]
FULL_CONFIG = {
    "targets": [
        {"kind": "openai", "base_url": "https://api.example.com/v1/", "api_key": "sk-test", "model": "gpt-test"},
        {"kind": "vllm_pool", "endpoints": ["http://vllm-0:8000", "http://vllm-1:8000/v1"], "model": "llama"},
        {"kind": "local", "name": "fallback"},
    ],
    "timeout": 12,
    "circuit": {"failure_threshold": 3, "cooldown_seconds": 5},
}


async def test_builds_each_kind_of_target_in_order():
    route = route_from_config(FULL_CONFIG)

    assert [target.name for target in route.targets] == [
        "openai:api.example.com:gpt-test",
        "vllm_pool:llama",
        "fallback",
    ]
    openai_target, pool_target, local_target = (target.provider for target in route.targets)
    assert type(openai_target) is OpenAICompatProvider  # the SDK client by default
    assert openai_target.base_url == "https://api.example.com/v1"
    assert openai_target.timeout == 12
    assert isinstance(pool_target, VllmPoolProvider)
    assert [replica.url for replica in pool_target.replicas] == ["http://vllm-0:8000", "http://vllm-1:8000"]
    assert {type(replica.provider) for replica in pool_target.replicas} == {AiohttpOpenAICompatProvider}
    assert isinstance(local_target, LocalProvider)
    assert local_target.seconds_per_word == 0.0  # tests run without pacing
    assert route.targets[2].circuit_key is None
    assert route.targets[0].circuit_key.startswith("parley:circuit:")
    assert route.first_token_timeout == 12
    assert route.breaker.policy.failure_threshold == 3
    assert route.breaker.policy.cooldown_seconds == 5
    await route.aclose()


def test_same_upstream_and_key_share_a_circuit_and_a_tenant_prefix_is_applied():
    one = route_from_config({"targets": [FULL_CONFIG["targets"][0]]})
    two = route_from_config({"targets": [{**FULL_CONFIG["targets"][0], "name": "renamed"}]}, schema_name="acme")
    other_key = route_from_config({"targets": [{**FULL_CONFIG["targets"][0], "api_key": "sk-other"}]})

    assert two.targets[0].circuit_key == "t:acme:circuit:" + one.targets[0].circuit_key.rsplit(":", 1)[1]
    assert other_key.targets[0].circuit_key != one.targets[0].circuit_key


def test_the_client_can_be_chosen_per_target():
    route = route_from_config(
        {
            "targets": [
                {"kind": "openai", "base_url": "http://a.example/v1", "model": "m", "client": "aiohttp"},
                {"kind": "vllm_pool", "endpoints": ["http://b.example"], "model": "m", "client": "sdk"},
            ]
        }
    )

    assert type(route.targets[0].provider) is AiohttpOpenAICompatProvider
    assert type(route.targets[1].provider.replicas[0].provider) is OpenAICompatProvider


def test_default_names_of_repeated_targets_stay_unique():
    target = {"kind": "openai", "base_url": "http://a.example/v1", "model": "m"}

    route = route_from_config({"targets": [target, {**target, "api_key": "other"}]})

    assert [target.name for target in route.targets] == ["openai:a.example:m", "openai:a.example:m#1"]


LOCAL = {"kind": "local"}


def one_target(**fields) -> dict:
    return {"targets": [fields]}


def pool(*endpoints: str) -> dict:
    return one_target(kind="vllm_pool", endpoints=list(endpoints), model="m")


INVALID = [
    ("not_an_object_case", [], ""),
    ("no_targets_case", {"targets": []}, "targets"),
    ("unknown_route_field_case", {"targets": [LOCAL], "colour": "red"}, "colour"),
    ("unknown_kind_case", one_target(kind="gpt"), "targets.0.kind"),
    ("missing_base_url_case", {"targets": [LOCAL, {"kind": "openai", "model": "m"}]}, "targets.1.base_url"),
    ("bad_url_case", one_target(kind="openai", base_url="ftp://x", model="m"), "targets.0.base_url"),
    ("missing_model_case", one_target(kind="openai", base_url="http://x"), "targets.0.model"),
    ("unknown_target_field_case", one_target(kind="local", model="m"), "targets.0.model"),
    ("no_endpoints_case", pool(), "targets.0.endpoints"),
    ("bad_endpoint_case", pool("http://a", "vllm-1"), "targets.0.endpoints.1"),
    ("twice_endpoint_case", pool("http://a", "http://a/"), "targets.0.endpoints"),
    ("negative_timeout_case", {"targets": [LOCAL], "timeout": -1}, "timeout"),
    ("boolean_timeout_case", one_target(kind="local", timeout=True), "targets.0.timeout"),
    ("zero_threshold_case", {"targets": [LOCAL], "circuit": {"failure_threshold": 0}}, "circuit.failure_threshold"),
    ("duplicate_name_case", {"targets": [{**LOCAL, "name": "a"}, {**LOCAL, "name": "a"}]}, "targets.1.name"),
    ("bad_name_case", one_target(kind="local", name="has space"), "targets.0.name"),
    ("too_many_targets_case", {"targets": [LOCAL] * 9}, "targets"),
    (
        "unknown_client_case",
        one_target(kind="openai", base_url="http://x", model="m", client="curl"),
        "targets.0.client",
    ),
]


@pytest.mark.parametrize(("config", "param"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_configuration_names_the_field(config, param):
    param = f"provider_route.{param}" if param else "provider_route"

    with pytest.raises(ValidationFailed) as caught:
        validate_route_config(config, param_prefix="provider_route")

    assert caught.value.param == param
    assert caught.value.message.startswith(f"{param}: ")
    assert caught.value.status_code == 400


def test_valid_configuration_is_normalised():
    cleaned = validate_route_config(FULL_CONFIG)

    assert cleaned["targets"][0]["base_url"] == "https://api.example.com/v1"
    assert cleaned["targets"][1]["endpoints"] == ["http://vllm-0:8000", "http://vllm-1:8000/v1"]
    assert cleaned["circuit"] == {"failure_threshold": 3, "cooldown_seconds": 5}


async def test_build_route_reuses_one_route_per_configuration_on_a_loop():
    local_only = {"targets": [{"kind": "local"}]}

    first = build_route(local_only)
    again = build_route({"targets": [{"kind": "local"}]})
    other = build_route({"targets": [{"kind": "local", "name": "other"}]})
    await routes_close()

    assert first is again
    assert other is not first


async def test_build_route_keeps_circuits_in_redis_and_answers(mock_llm):
    route = build_route({"targets": [{"kind": "openai", "base_url": mock_llm.base_url, "model": "mock-model"}]})

    completion = await collect(route.stream(ChatRequest(messages=HELLO)))
    await routes_close()

    assert isinstance(route.breaker.store, RedisCircuitStore)
    assert completion.usage.target == "openai:127.0.0.1:mock-model"
    assert completion.usage.completion_tokens == 20


def test_build_route_rejects_bad_configuration():
    with pytest.raises(ValidationFailed) as caught:
        build_route({"targets": [{"kind": "openai"}]})

    assert caught.value.param == "targets.0.base_url"
