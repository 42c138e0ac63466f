"""OpenAPI descriptions of the authentication classes (drf-spectacular extensions)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "prly_<prefix>_<secret>",
            "description": "A Parley API key: `Authorization: Bearer prly_…`.",
        }


class JwtScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.TenantJWTAuthentication"
    name = "jwt"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token from POST /api/v1/auth/token/ on the tenant's host.",
        }


class OAuth2Scheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.TenantOAuth2Authentication"
    name = "oauth2"

    def get_security_definition(self, auto_schema):
        scopes = {
            "chat": "Chat with bots",
            "knowledge:read": "Read knowledge",
            "knowledge:write": "Write knowledge",
            "admin": "Administer the tenant",
        }
        return {
            "type": "oauth2",
            "flows": {
                "authorizationCode": {"authorizationUrl": "/o/authorize/", "tokenUrl": "/o/token/", "scopes": scopes},
                "clientCredentials": {"tokenUrl": "/o/token/", "scopes": scopes},
            },
        }


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.TenantSessionAuthentication"
    name = "session"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": "sessionid"}
