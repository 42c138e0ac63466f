"""Building blocks every app's API uses: the base view and strict serializers."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.views import APIView

from tenants.permissions import HasScope


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a typo is a 400, not a silently ignored setting."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
        return super().to_internal_value(data)


class TenantAPIView(APIView):
    """An endpoint of one tenant's API. Subclasses declare ``required_scopes`` per method."""

    permission_classes = [HasScope]
    required_scopes: dict[str, str] = {}
