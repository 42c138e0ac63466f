"""Platform endpoints: identity, JWT tokens, API keys, and the OpenAI-compatible model list."""

from __future__ import annotations

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.tokens import RefreshToken

from tenants import selectors, services
from tenants.api_base import StrictSerializer, TenantAPIView
from tenants.authentication import membership_scopes
from tenants.errors import AuthenticationFailed, NotFound
from tenants.models import ApiKey

# --- identity -----------------------------------------------------------------------------------


class MeApi(TenantAPIView):
    """Who am I, in which tenant, with which scopes: the first call to try a credential with."""

    class OutputSerializer(serializers.Serializer):
        tenant = serializers.CharField(help_text="The tenant's slug.")
        kind = serializers.ChoiceField(
            choices=["api_key", "jwt", "oauth2", "session"], help_text="The kind of credential that was sent."
        )
        scopes = serializers.ListField(child=serializers.ChoiceField(choices=ApiKey.Scope.choices))
        email = serializers.EmailField(allow_null=True, help_text="The person's email; null for API keys and clients.")
        api_key_id = serializers.IntegerField(allow_null=True, help_text="With an API key: its id.")

    @extend_schema(responses=OutputSerializer)
    def get(self, request):
        context = request.auth
        return Response(
            self.OutputSerializer(
                {
                    "tenant": context.tenant.slug,
                    "kind": context.kind,
                    "scopes": sorted(context.scopes),
                    "email": getattr(request.user, "email", None),
                    "api_key_id": context.api_key_id,
                }
            ).data
        )


# --- JWT ----------------------------------------------------------------------------------------


_NOT_A_TENANT_HOST = OpenApiResponse(description="Not on a workspace's host: tokens are issued per tenant.")


def _tenant_or_404(request):
    tenant = getattr(request, "tenant", None)
    if tenant is None or tenant.schema_name == "public":
        raise NotFound("Use your workspace's host (<slug>.<base domain>) to obtain tokens.")
    return tenant


class TokenObtainApi(APIView):
    """Email + password → access and refresh JWTs carrying this tenant."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    class InputSerializer(StrictSerializer):
        email = serializers.EmailField()
        password = serializers.CharField(trim_whitespace=False)

    class OutputSerializer(serializers.Serializer):
        access = serializers.CharField()
        refresh = serializers.CharField()

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer, 404: _NOT_A_TENANT_HOST})
    def post(self, request):
        tenant = _tenant_or_404(request)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = authenticate(
            request._request,
            username=serializer.validated_data["email"].lower(),
            password=serializer.validated_data["password"],
        )
        if user is None or membership_scopes(user, tenant) is None:
            raise AuthenticationFailed("Wrong email or password for this workspace.", code="invalid_credentials")
        refresh = RefreshToken.for_user(user)
        refresh["tenant"] = tenant.schema_name
        return Response({"access": str(refresh.access_token), "refresh": str(refresh)})


class TokenRefreshApi(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    class InputSerializer(StrictSerializer):
        refresh = serializers.CharField()

    @extend_schema(request=InputSerializer, responses={200: TokenObtainApi.OutputSerializer, 404: _NOT_A_TENANT_HOST})
    def post(self, request):
        from rest_framework_simplejwt.exceptions import TokenError

        tenant = _tenant_or_404(request)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            refresh = RefreshToken(serializer.validated_data["refresh"])
        except TokenError as error:
            raise AuthenticationFailed("Invalid or expired refresh token.", code="invalid_token") from error
        if refresh.get("tenant") != tenant.schema_name:
            raise AuthenticationFailed("This token was not issued for this tenant.", code="invalid_token")
        from tenants.models import User

        user = User.objects.filter(pk=refresh.get("user_id"), is_active=True).first()
        if user is None or membership_scopes(user, tenant) is None:
            raise AuthenticationFailed("You are no longer a member of this tenant.", code="invalid_token")
        return Response({"access": str(refresh.access_token), "refresh": str(refresh)})


# --- API keys -----------------------------------------------------------------------------------


class ApiKeyOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at"]


class ApiKeyListCreateApi(TenantAPIView):
    required_scopes = {"GET": "admin", "POST": "admin"}

    class InputSerializer(StrictSerializer):
        name = serializers.CharField(max_length=100)
        scopes = serializers.ListField(child=serializers.ChoiceField(choices=ApiKey.Scope.values), min_length=1)
        expires_at = serializers.DateTimeField(required=False, allow_null=True)

    class CreatedSerializer(ApiKeyOutputSerializer):
        key = serializers.CharField(help_text="The full key. Shown once; store it now.")

        class Meta(ApiKeyOutputSerializer.Meta):
            fields = [*ApiKeyOutputSerializer.Meta.fields, "key"]

    @extend_schema(responses=ApiKeyOutputSerializer(many=True))
    def get(self, request):
        keys = selectors.api_key_list(tenant=request.tenant)
        return Response({"object": "list", "data": ApiKeyOutputSerializer(keys, many=True).data})

    @extend_schema(request=InputSerializer, responses={201: CreatedSerializer})
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created = services.api_key_create(
            tenant=request.tenant,
            created_by=request.user if getattr(request.user, "pk", None) else None,
            **serializer.validated_data,
        )
        data = ApiKeyOutputSerializer(created.api_key).data
        data["key"] = created.raw_key
        return Response(data, status=status.HTTP_201_CREATED)


class ApiKeyDetailApi(TenantAPIView):
    required_scopes = {"GET": "admin", "DELETE": "admin"}

    @extend_schema(responses=ApiKeyOutputSerializer)
    def get(self, request, api_key_id: int):
        return Response(
            ApiKeyOutputSerializer(selectors.api_key_get(tenant=request.tenant, api_key_id=api_key_id)).data
        )

    @extend_schema(
        responses={200: ApiKeyOutputSerializer}, description="Revokes the key (kept, revoked, for the audit trail)."
    )
    def delete(self, request, api_key_id: int):
        api_key = selectors.api_key_get(tenant=request.tenant, api_key_id=api_key_id)
        return Response(ApiKeyOutputSerializer(services.api_key_revoke(api_key=api_key)).data)
