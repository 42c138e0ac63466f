"""Scope checks shared by every endpoint: views declare what they need, per HTTP method."""

from __future__ import annotations

from rest_framework.permissions import BasePermission

from tenants.authentication import AuthContext
from tenants.errors import AuthenticationFailed, PermissionDeniedError


class HasScope(BasePermission):
    """Requires an authenticated caller of the request's tenant holding the view's scope.

    A view sets ``required_scopes = {"GET": "chat", "POST": "admin"}`` (``"*"`` for any method).
    The ``admin`` scope includes every other scope.
    """

    def has_permission(self, request, view) -> bool:
        context = request.auth
        if not isinstance(context, AuthContext):
            raise AuthenticationFailed(
                "Authentication required: send 'Authorization: Bearer <API key or token>'.",
                code="missing_credentials",
            )
        if getattr(request, "tenant", None) is None or context.tenant.pk != request.tenant.pk:
            raise AuthenticationFailed("These credentials do not belong to this tenant.")
        scopes = getattr(view, "required_scopes", {})
        scope_require(context.scopes, scopes.get(request.method, scopes.get("*")))
        return True


def scope_require(held: frozenset[str], required: str | None) -> None:
    """The one scope check of every transport: ``required`` held, or ``admin`` (which includes
    every scope); PermissionDeniedError (403) otherwise."""
    if required is None or required in held or "admin" in held:
        return
    raise PermissionDeniedError(
        f"This credential lacks the '{required}' scope needed for this operation.", code="insufficient_scope"
    )
