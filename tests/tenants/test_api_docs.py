"""The interactive API docs work on a machine without internet: every asset is ours."""

from __future__ import annotations

import re

import pytest

ASSET_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.mark.django_db
def test_api_docs_reference_no_external_host(client):
    response = client.get("/api/docs/")

    page = response.content.decode()
    references = ASSET_REFERENCE.findall(page)
    assert response.status_code == 200
    assert references, "the page should load Swagger UI's script and stylesheet"
    assert [reference for reference in references if not reference.startswith("/")] == []
    assert "//" not in "".join(references)
    assert re.findall(r"https?://", page) == []
    assert '"validatorUrl": null' in page


@pytest.mark.django_db
def test_api_docs_assets_are_served(client):
    page = client.get("/api/docs/").content.decode()

    references = ASSET_REFERENCE.findall(page)
    statuses = {reference: client.get(reference).status_code for reference in references}
    assert statuses == dict.fromkeys(references, 200)
    assert any(reference.endswith("swagger-ui-bundle.js") for reference in references)
    assert any(reference.endswith("swagger-ui.css") for reference in references)
