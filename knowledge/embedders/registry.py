"""Embedders from a knowledge base's plain configuration, validated, one instance per process.

A knowledge base's ``embedder`` configuration is a dict::

    {"kind": "local"}                                  # the default: all-MiniLM-L6-v2, 384 dimensions
    {
        "kind": "openai",
        "base_url": "https://api.openai.com/v1",        # any OpenAI-compatible server
        "model": "text-embedding-3-small",
        "api_key": "sk-…",                              # optional (self-hosted servers)
        "dimensions": 1536,                              # required: one of SUPPORTED_DIMENSIONS
        "send_dimensions": true,                         # optional: ask the model for that size
        "batch_size": 64,                                # optional: texts per request, 1 to 2048
        "timeout_s": 30,                                 # optional: seconds per request
        "max_input_tokens": 8191,                        # optional: the model's input limit
    }

:func:`validate_embedder_config` returns the normalised form (defaults filled in) or raises
:class:`~tenants.errors.ValidationFailed`; :func:`get_embedder` returns the shared instance.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any

from knowledge.embedders.base import Embedder
from knowledge.embedders.local import DIMENSIONS as LOCAL_DIMENSIONS
from knowledge.embedders.local import LocalEmbedder
from knowledge.embedders.openai_compat import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_INPUT_TOKENS,
    DEFAULT_TIMEOUT_SECONDS,
    OpenAICompatEmbedder,
)
from tenants.errors import ValidationFailed
from tenants.outbound import OutboundRefused, validate_outbound_url

# The vector sizes with an ANN index in every tenant schema: a knowledge base can use only these.
SUPPORTED_DIMENSIONS = (384, 768, 1024, 1536)
MAX_BATCH_SIZE = 2048  # OpenAI's limit on inputs per request
MAX_TIMEOUT_SECONDS = 600.0
MAX_STRING_LENGTH = 512
MAX_URL_LENGTH = 2048
EMBEDDERS_PER_PROCESS = 256  # distinct configurations kept; the least recently used is dropped

KINDS = ("local", "openai")
_FIELDS = {
    "local": ("kind", "dimensions"),
    "openai": (
        "kind",
        "base_url",
        "model",
        "api_key",
        "dimensions",
        "send_dimensions",
        "batch_size",
        "timeout_s",
        "max_input_tokens",
    ),
}


def _fail(message: str) -> ValidationFailed:
    return ValidationFailed(f"embedder: {message}", param="embedder")


def _integer(config: dict[str, Any], name: str, *, minimum: int, maximum: int) -> int:
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise _fail(f"'{name}' must be an integer from {minimum} to {maximum}.")
    return value


def _string(config: dict[str, Any], name: str) -> str:
    value = config[name]
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_STRING_LENGTH:
        raise _fail(f"'{name}' must be a non-empty string of at most {MAX_STRING_LENGTH} characters.")
    return value.strip()


def _base_url(value: Any) -> str:
    # The one outbound guard: http(s), no credentials, query or fragment, no internal address
    # unless the operator allows it (the connection is checked again: tenants.outbound).
    try:
        return validate_outbound_url(value)
    except OutboundRefused as error:
        raise _fail(f"'base_url' {error}") from None


def _dimensions(config: dict[str, Any]) -> int:
    value = config["dimensions"]
    if value not in SUPPORTED_DIMENSIONS or isinstance(value, bool) or not isinstance(value, int):
        supported = ", ".join(str(size) for size in SUPPORTED_DIMENSIONS)
        raise _fail(f"'dimensions' must be one of {supported}.")
    return value


def validate_embedder_config(config: dict) -> dict:
    """``config`` checked and normalised, defaults filled in; :class:`ValidationFailed` names the problem.

    An empty configuration means the bundled local embedder.
    """
    if not isinstance(config, dict):
        raise _fail('must be an object such as {"kind": "local"}.')
    kind = config.get("kind", "local")
    if kind not in KINDS:
        raise _fail(f"unknown kind {kind!r} (known: {', '.join(KINDS)}).")
    unknown = sorted(str(name) for name in set(config) - set(_FIELDS[kind]))
    if unknown:
        raise _fail(f"unknown field(s) {', '.join(unknown)} for kind {kind!r} (known: {', '.join(_FIELDS[kind])}).")
    if kind == "local":
        dimensions = config.get("dimensions", LOCAL_DIMENSIONS)
        if dimensions != LOCAL_DIMENSIONS or isinstance(dimensions, bool):
            raise _fail(f"the local embedder has {LOCAL_DIMENSIONS} dimensions, not {dimensions!r}.")
        return {"kind": "local"}

    for required in ("base_url", "model", "dimensions"):
        if required not in config:
            raise _fail(f"'{required}' is required for kind 'openai'.")
    cleaned: dict[str, Any] = {
        "kind": "openai",
        "base_url": _base_url(config["base_url"]),
        "model": _string(config, "model"),
        "dimensions": _dimensions(config),
        "send_dimensions": False,
        "batch_size": DEFAULT_BATCH_SIZE,
        "timeout_s": DEFAULT_TIMEOUT_SECONDS,
        "max_input_tokens": DEFAULT_MAX_INPUT_TOKENS,
    }
    if "api_key" in config and config["api_key"] is not None:
        cleaned["api_key"] = _string(config, "api_key")
    if "send_dimensions" in config:
        if not isinstance(config["send_dimensions"], bool):
            raise _fail("'send_dimensions' must be true or false.")
        cleaned["send_dimensions"] = config["send_dimensions"]
    if "batch_size" in config:
        cleaned["batch_size"] = _integer(config, "batch_size", minimum=1, maximum=MAX_BATCH_SIZE)
    if "timeout_s" in config:
        value = config["timeout_s"]
        is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not is_number or not 0 < value <= MAX_TIMEOUT_SECONDS:
            raise _fail(f"'timeout_s' must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:g}.")
        cleaned["timeout_s"] = float(value)
    if "max_input_tokens" in config:
        cleaned["max_input_tokens"] = _integer(config, "max_input_tokens", minimum=16, maximum=1_000_000)
    return cleaned


def embedder_dimensions(config: dict) -> int:
    """The vector size the configured embedder produces."""
    cleaned = validate_embedder_config(config)
    return LOCAL_DIMENSIONS if cleaned["kind"] == "local" else cleaned["dimensions"]


_embedders: OrderedDict[str, Embedder] = OrderedDict()
_embedders_lock = threading.Lock()


def get_embedder(config: dict) -> Embedder:
    """The embedder for ``config`` (validated here), one instance per distinct configuration per process.

    Instances are thread-safe and cheap to keep; the local model itself loads lazily, once per
    process, on the first embedding (see :mod:`knowledge.embedders.local`).
    """
    cleaned = validate_embedder_config(config)
    cache_key = json.dumps(cleaned, sort_keys=True)  # in memory only, so the API key may be part of it
    with _embedders_lock:
        embedder = _embedders.get(cache_key)
        if embedder is not None:
            _embedders.move_to_end(cache_key)
            return embedder
        if cleaned["kind"] == "local":
            embedder = LocalEmbedder()
        else:
            embedder = OpenAICompatEmbedder(**{name: value for name, value in cleaned.items() if name != "kind"})
        _embedders[cache_key] = embedder
        if len(_embedders) > EMBEDDERS_PER_PROCESS:
            # Not closed: another thread may still be using it; its connections close when collected.
            _embedders.popitem(last=False)
    return embedder
