"""The operator's Django admin on the public host provisions and suspends through the services."""

import pytest
from django.test import Client
from django_tenants.utils import schema_exists

from tenants.models import Tenant, User

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client():
    operator = User.objects.create_superuser(email="ops@parley.test", password="operator-password")
    client = Client()
    client.force_login(operator)
    return client


def test_operator_creates_tenant_with_schema(operator_client):
    response = operator_client.post(
        "/admin/tenants/tenant/add/",
        {
            "name": "Stark",
            "slug": "stark",
            "plan": "",
            "conversation_retention_days": "30",
            "domains-TOTAL_FORMS": "0",
            "domains-INITIAL_FORMS": "0",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 302, response.content[:2000]
    assert Tenant.objects.get(slug="stark").conversation_retention_days == 30
    assert schema_exists("t_stark")


def test_operator_suspends_tenant(operator_client, tenant_pair):
    response = operator_client.post(
        "/admin/tenants/tenant/", {"action": "suspend", "_selected_action": [tenant_pair.b.pk]}
    )

    assert response.status_code == 302
    assert Tenant.objects.get(pk=tenant_pair.b.pk).status == "suspended"


def test_admin_not_served_on_tenant_hosts(operator_client, tenant_pair):
    response = operator_client.get("/admin/", HTTP_HOST="acme.localhost")

    assert response.status_code == 404


def test_tenant_member_cannot_reach_operator_admin(tenant_pair):
    client = Client()
    client.force_login(tenant_pair.owner_a)

    response = client.get("/admin/tenants/tenant/")

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
