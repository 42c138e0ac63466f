"""Security: an upstream's error text never reaches the tenant (issue 18, High 2): it names
internal hosts and echoes bodies; the tenant sees a generic message, the logs get the details."""

from __future__ import annotations

import pytest

from chat.engine import TurnOutcome, _terminal_event
from chat.providers.base import BadRequest, ContextTooLong, ProviderError, RateLimited, Timeout, Unavailable

LEAK = "root:x:0:0 from http://10.1.2.3:8080/admin"


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ProviderError(f"The model server answered 500: {LEAK}"), id="generic_case"),
        pytest.param(BadRequest(f"The model server refused: {LEAK}"), id="bad_request_case"),
        pytest.param(Unavailable(f"Could not get an answer from {LEAK}"), id="unavailable_case"),
        pytest.param(Timeout(f"{LEAK} did not answer in time."), id="timeout_case"),
        pytest.param(RateLimited(f"429 {LEAK}"), id="rate_limited_case"),
        pytest.param(ContextTooLong(f"too long {LEAK}"), id="context_case"),
    ],
)
def test_error_event_carries_no_upstream_text(error):
    kind, data = _terminal_event(TurnOutcome(error=error, finish_reason="error"))

    assert kind == "error"
    assert "10.1.2.3" not in data["message"]
    assert "root:x" not in data["message"]
    assert data["message"]
    assert data["code"] == error.code
