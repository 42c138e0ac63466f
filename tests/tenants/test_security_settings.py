"""Security: production settings refuse to start without their own secrets (issue 18, Low 13)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings

PRODUCTION = {
    "PARLEY_ENV": "production",
    "DJANGO_SECRET_KEY": "a-production-secret-key-for-this-test-only",
    "DATABASE_URL": "postgres://nobody@127.0.0.1:1/nothing",
    "REDIS_URL": "redis://127.0.0.1:1/0",
}


def _load_settings(**env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PARLEY_", "DJANGO_"))}
    environment.update({**PRODUCTION, **env})
    return subprocess.run(
        [sys.executable, "-c", "import config.settings as s; print(s.PARLEY_API_KEY_PEPPER)"],
        cwd=settings.BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "pepper",
    [
        pytest.param(None, id="missing_case"),
        pytest.param(PRODUCTION["DJANGO_SECRET_KEY"], id="same_as_secret_key_case"),
        pytest.param("short", id="too_short_case"),
    ],
)
def test_production_requires_its_own_api_key_pepper(pepper):
    loaded = _load_settings(**({"PARLEY_API_KEY_PEPPER": pepper} if pepper is not None else {}))

    assert loaded.returncode != 0
    assert "PARLEY_API_KEY_PEPPER" in loaded.stderr


def test_production_starts_with_a_separate_pepper():
    loaded = _load_settings(PARLEY_API_KEY_PEPPER="another-long-random-pepper-value-0123456789")

    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "another-long-random-pepper-value-0123456789"
