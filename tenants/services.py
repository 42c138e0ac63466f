"""Tenant lifecycle, users, memberships and API keys: the writes of the platform."""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
import shutil
import string
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.mail import send_mail
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_tenants.utils import schema_exists

from billing.models import Plan
from tenants.connection import connection
from tenants.errors import Conflict, ValidationFailed
from tenants.models import ApiKey, Domain, Invitation, Membership, PublicBot, SchemaTemplate, Tenant, User
from tenants.redis import tenant_keys_purge
from tenants.resolution import api_key_cache_invalidate, public_bot_cache_invalidate, tenant_cache_invalidate

TEMPLATE_SCHEMA = settings.TENANT_BASE_SCHEMA
SLUG_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,48}[a-z0-9]$")
RESERVED_SLUGS = frozenset({"www", "api", "admin", "app", "public", "static", "media", "widget", "tenant-template"})
API_KEY_PREFIX = "prly_"
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_TEMPLATE_NAME = re.compile(rf"\b{re.escape(TEMPLATE_SCHEMA)}\.")


# --- tenants ------------------------------------------------------------------------------------


def tenant_template_sync(*, verbosity: int = 0) -> SchemaTemplate | None:
    """Create and migrate the template schema, then capture its DDL for provisioning.

    Run after every deploy's migrations (``manage.py migrate_all`` does). Without a pg_dump
    binary nothing is captured and provisioning falls back to running migrations.
    """
    if not schema_exists(TEMPLATE_SCHEMA):
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{TEMPLATE_SCHEMA}"')
    call_command("migrate_schemas", schema_name=TEMPLATE_SCHEMA, interactive=False, verbosity=verbosity)
    connection.set_schema_to_public()
    ddl = _dump_template_ddl()
    if ddl is None:
        return None
    latest = SchemaTemplate.objects.order_by("-created_at").first()
    if latest is not None and latest.ddl == ddl:
        return latest
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY c.relname",
            [TEMPLATE_SCHEMA],
        )
        tables = [row[0] for row in cursor.fetchall()]
        data_tables = []
        for table in tables:
            cursor.execute(f'SELECT EXISTS (SELECT 1 FROM "{TEMPLATE_SCHEMA}"."{table}")')
            if cursor.fetchone()[0]:
                data_tables.append(table)
        cursor.execute(f'SELECT count(*) FROM "{TEMPLATE_SCHEMA}".django_migrations')
        migrations_applied = cursor.fetchone()[0]
    template = SchemaTemplate.objects.create(ddl=ddl, data_tables=data_tables, migrations_applied=migrations_applied)
    SchemaTemplate.objects.exclude(pk=template.pk).delete()
    return template


def _dump_template_ddl() -> str | None:
    binary = settings.PARLEY_PG_DUMP
    if not binary or not Path(binary).exists():
        return None
    db = settings.DATABASES["default"]
    command = [binary, "--schema-only", f"--schema={TEMPLATE_SCHEMA}", "--no-owner", "--no-privileges", "--no-comments"]
    if db.get("HOST"):
        command += ["-h", db["HOST"]]
    if db.get("PORT"):
        command += ["-p", str(db["PORT"])]
    if db.get("USER"):
        command += ["-U", db["USER"]]
    command.append(db["NAME"])
    environment = {**os.environ, "PGPASSWORD": db.get("PASSWORD") or ""}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pg_dump of the tenant template failed: {result.stderr.strip()[:500]}")
    # Session settings (search_path = '' above all) must not leak into our connection; every
    # name in pg_dump's output is schema-qualified, so they are not needed.
    lines = [
        line
        for line in result.stdout.splitlines()
        if line and not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config"))
    ]
    # No foreign keys from tenant schemas to public tables (users): each one adds triggers on the
    # public table, which at thousands of tenants slow every write to it and every provisioning
    # (measured in tests/perf). The services keep those references instead.
    statements = "\n".join(lines).split(";\n")
    return ";\n".join(statement for statement in statements if "REFERENCES public." not in statement)


def _provision_schema(schema_name: str) -> None:
    template = SchemaTemplate.objects.order_by("-created_at").first()
    with connection.cursor() as cursor:
        if template is None:
            # No captured DDL (no pg_dump where migrate_all ran): migrate the schema instead.
            cursor.execute(f'CREATE SCHEMA "{schema_name}"')
            call_command("migrate_schemas", schema_name=schema_name, interactive=False, verbosity=0)
            connection.set_schema_to_public()
            return
        ddl = _TEMPLATE_NAME.sub(f"{schema_name}.", template.ddl).replace(
            f"CREATE SCHEMA {TEMPLATE_SCHEMA};", f"CREATE SCHEMA {schema_name};"
        )
        cursor.execute(ddl)
        for table in template.data_tables:
            cursor.execute(
                f'INSERT INTO "{schema_name}"."{table}" OVERRIDING SYSTEM VALUE '
                f'SELECT * FROM "{TEMPLATE_SCHEMA}"."{table}"'
            )
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('\"{schema_name}\".\"{table}\"', 'id'), "
                f'(SELECT max(id) FROM "{schema_name}"."{table}"))'
            )


def _schema_name_for(slug: str) -> str:
    return "t_" + slug.replace("-", "_")


def tenant_create(*, name: str, slug: str, owner: User | None = None, plan_code: str | None = None) -> Tenant:
    """Provision a tenant: its row, primary domain, schema (replayed from the template) and owner.

    Replaying the template's DDL makes provisioning constant-time however many migrations
    exist. It all happens in one transaction (PostgreSQL DDL is transactional): a failure leaves
    nothing behind.
    """
    slug = slug.strip().lower()
    if not SLUG_PATTERN.match(slug) or slug in RESERVED_SLUGS:
        raise ValidationFailed(
            "Tenant slug must be 3-50 characters of lowercase letters, digits and hyphens, "
            "start with a letter, and not be reserved.",
            param="slug",
        )
    if not name.strip():
        raise ValidationFailed("Tenant name must not be empty.", param="name")
    plan = None
    if plan_code:
        plan = Plan.objects.filter(code=plan_code).first()
        if plan is None:
            raise ValidationFailed(f"Unknown plan {plan_code!r}.", param="plan")
    if not schema_exists(TEMPLATE_SCHEMA):
        tenant_template_sync()

    schema_name = _schema_name_for(slug)
    connection.set_schema_to_public()
    if Tenant.objects.filter(slug=slug).exists():
        raise Conflict(f"A tenant with slug {slug!r} already exists.", param="slug")
    try:
        with transaction.atomic():
            tenant = Tenant.objects.create(name=name.strip(), slug=slug, schema_name=schema_name, plan=plan)
            Domain.objects.create(domain=f"{slug}.{settings.PARLEY_BASE_DOMAIN}", tenant=tenant, is_primary=True)
            _provision_schema(schema_name)
            if owner is not None:
                Membership.objects.create(user=owner, tenant=tenant, role=Membership.Role.OWNER)
    except (IntegrityError, DjangoValidationError) as error:
        # A concurrent creation of the same slug won the race (unique slug and schema name).
        raise Conflict(f"A tenant with slug {slug!r} already exists.", param="slug") from error
    finally:
        connection.set_schema_to_public()
    # A negative cache entry for this host may exist from before the tenant did.
    tenant_cache_invalidate(tenant)
    return tenant


def tenant_suspend(*, tenant: Tenant, reason: str = "") -> Tenant:
    Tenant.objects.filter(pk=tenant.pk).update(status=Tenant.Status.SUSPENDED, suspended_reason=reason[:500])
    tenant.refresh_from_db()
    tenant_cache_invalidate(tenant)
    return tenant


def tenant_activate(*, tenant: Tenant) -> Tenant:
    Tenant.objects.filter(pk=tenant.pk).update(status=Tenant.Status.ACTIVE, suspended_reason="")
    tenant.refresh_from_db()
    tenant_cache_invalidate(tenant)
    return tenant


def tenant_media_root(tenant: Tenant) -> Path:
    return Path(settings.MEDIA_ROOT) / tenant.schema_name


@dataclass(frozen=True)
class TenantDeletion:
    schema_name: str
    redis_keys_deleted: int


def tenant_delete(*, tenant: Tenant) -> TenantDeletion:
    """Delete a tenant for good: its schema (all its data), its public rows, Redis keys and files."""
    schema_name = tenant.schema_name
    connection.set_schema_to_public()
    tenant_cache_invalidate(tenant)
    with transaction.atomic():
        # TenantMixin.delete drops the schema (auto_drop_schema); cascades remove domains,
        # memberships, API keys and public bot ids.
        tenant.delete(force_drop=True)
    redis_keys_deleted = tenant_keys_purge(schema_name)
    shutil.rmtree(Path(settings.MEDIA_ROOT) / schema_name, ignore_errors=True)
    return TenantDeletion(schema_name=schema_name, redis_keys_deleted=redis_keys_deleted)


# --- users and memberships ----------------------------------------------------------------------


def user_create(*, email: str, password: str | None, full_name: str = "") -> User:
    email = email.strip().lower()
    if User.objects.filter(email=email).exists():
        raise Conflict(f"A user with email {email!r} already exists.", param="email")
    return User.objects.create_user(email=email, password=password, full_name=full_name)


_USER_TABLES = (  # tenant-schema tables that reference public users (without a foreign key)
    "oauth2_provider_idtoken",
    "oauth2_provider_refreshtoken",
    "oauth2_provider_accesstoken",
    "oauth2_provider_grant",
    "oauth2_provider_devicegrant",
    "oauth2_provider_application",
)


def user_delete(*, user: User) -> None:
    """Delete a person: their OAuth2 applications and tokens in every tenant, then the user
    (memberships cascade; API keys they created stay, with no creator)."""
    schemas = list(Tenant.objects.values_list("schema_name", flat=True))
    with transaction.atomic(), connection.cursor() as cursor:
        for schema_name in schemas:
            for table in _USER_TABLES:
                cursor.execute(f'DELETE FROM "{schema_name}"."{table}" WHERE user_id = %s', [user.pk])
        connection.set_schema_to_public()
        user.delete()


def membership_set(*, user: User, tenant: Tenant, role: str) -> Membership:
    if role not in Membership.Role.values:
        raise ValidationFailed(f"Role must be one of {', '.join(Membership.Role.values)}.", param="role")
    membership, _ = Membership.objects.update_or_create(user=user, tenant=tenant, defaults={"role": role})
    return membership


def public_bot_register(*, tenant: Tenant, public_id: str) -> PublicBot:
    bot, _ = PublicBot.objects.get_or_create(public_id=public_id, defaults={"tenant": tenant})
    if bot.tenant_id != tenant.pk:
        raise Conflict("That public id is taken.", param="public_id")
    public_bot_cache_invalidate(public_id)
    return bot


# --- API keys -----------------------------------------------------------------------------------


def api_key_hash(raw_key: str) -> str:
    return hmac.new(settings.PARLEY_API_KEY_PEPPER.encode(), raw_key.encode(), hashlib.sha256).hexdigest()


def api_key_parse_prefix(raw_key: str) -> str | None:
    """``prly_<8>_<secret>`` → ``prly_<8>``; None when the string is not shaped like a key."""
    if not raw_key.startswith(API_KEY_PREFIX):
        return None
    prefix_length = len(API_KEY_PREFIX) + 8
    if len(raw_key) < prefix_length + 20 or raw_key[prefix_length] != "_":
        return None
    return raw_key[:prefix_length]


@dataclass(frozen=True)
class CreatedApiKey:
    api_key: ApiKey
    raw_key: str  # shown once, never stored


def api_key_create(
    *,
    tenant: Tenant,
    name: str,
    scopes: list[str],
    created_by: User | None = None,
    expires_at: datetime | None = None,
) -> CreatedApiKey:
    name = name.strip()
    if not name:
        raise ValidationFailed("API key name must not be empty.", param="name")
    unknown = sorted(set(scopes) - set(ApiKey.Scope.values))
    if unknown or not scopes:
        raise ValidationFailed(
            f"Scopes must be a non-empty subset of {', '.join(ApiKey.Scope.values)}"
            + (f"; unknown: {', '.join(unknown)}." if unknown else "."),
            param="scopes",
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationFailed("expires_at must be in the future.", param="expires_at")
    for _attempt in range(5):
        prefix = API_KEY_PREFIX + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
        raw_key = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    tenant=tenant,
                    name=name[:100],
                    prefix=prefix,
                    secret_hash=api_key_hash(raw_key),
                    scopes=sorted(set(scopes)),
                    created_by=created_by,
                    expires_at=expires_at,
                )
        except IntegrityError:
            continue  # prefix collision (1 in 36^8 per key): draw again
        api_key_cache_invalidate(prefix)
        return CreatedApiKey(api_key=api_key, raw_key=raw_key)
    raise Conflict("Could not allocate a unique API key prefix; try again.")


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        api_key.refresh_from_db()
    api_key_cache_invalidate(api_key.prefix)
    return api_key


def api_key_touch(*, api_key_id: int, used_at: datetime) -> None:
    """Record last use; monotonic so that late, out-of-order updates never move it back."""
    from django.db.models import Q

    ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=used_at), pk=api_key_id).update(
        last_used_at=used_at
    )


# --- invitations and membership changes ---------------------------------------------------------

INVITATION_LIFETIME_DAYS = 7


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedInvitation:
    invitation: Invitation
    token: str  # goes into the emailed link only, never stored


def invitation_create(
    *, tenant: Tenant, email: str, role: str, invited_by: User | None, accept_url: Callable[[str], str]
) -> CreatedInvitation:
    """Invite ``email`` to ``tenant`` with ``role`` and email the link once the row is committed.

    ``accept_url(token)`` builds the absolute link (the caller knows the host it was asked on).
    A new invitation to the same address replaces the pending one.
    """
    email = email.strip().lower()
    if role not in Membership.Role.values:
        raise ValidationFailed(f"Role must be one of {', '.join(Membership.Role.values)}.", param="role")
    if Membership.objects.filter(tenant=tenant, user__email=email).exists():
        raise Conflict(f"{email} is already a member of this workspace.", param="email")
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        Invitation.objects.filter(tenant=tenant, email=email, accepted_at__isnull=True, revoked_at__isnull=True).update(
            revoked_at=now
        )
        invitation = Invitation.objects.create(
            tenant=tenant,
            email=email,
            role=role,
            token_hash=invitation_token_hash(token),
            invited_by=invited_by,
            expires_at=now + timedelta(days=INVITATION_LIFETIME_DAYS),
        )
        link = accept_url(token)
        inviter = invited_by.email if invited_by is not None else "An administrator"
        transaction.on_commit(
            lambda: send_mail(
                subject=f"You are invited to {tenant.name} on Parley",
                message=(
                    f"{inviter} invited you to join {tenant.name} on Parley as {invitation.get_role_display()}.\n\n"
                    f"Accept the invitation: {link}\n\n"
                    f"The link works once and expires in {INVITATION_LIFETIME_DAYS} days."
                ),
                from_email=None,
                recipient_list=[email],
            )
        )
    return CreatedInvitation(invitation=invitation, token=token)


def invitation_revoke(*, invitation: Invitation) -> None:
    Invitation.objects.filter(pk=invitation.pk, accepted_at__isnull=True, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )


def invitation_accept(*, invitation: Invitation, user: User) -> Membership:
    """Make ``user`` a member with the invited role; the invitation is used up (once, even when
    two requests race: the conditional update is the lock)."""
    if user.email.lower() != invitation.email.lower():
        raise ValidationFailed("This invitation was sent to another email address.", param="email")
    with transaction.atomic():
        claimed = Invitation.objects.filter(
            pk=invitation.pk, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        ).update(accepted_at=timezone.now())
        if not claimed:
            raise ValidationFailed("This invitation has expired or was already used.", param="token")
        existing = Membership.objects.filter(user=user, tenant_id=invitation.tenant_id).first()
        if existing is not None:
            return existing  # never demote someone who joined meanwhile
        return Membership.objects.create(user=user, tenant_id=invitation.tenant_id, role=invitation.role)


def _lock_owners(tenant: Tenant) -> list[int]:
    return list(
        Membership.objects.select_for_update()
        .filter(tenant=tenant, role=Membership.Role.OWNER)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def membership_role_change(*, membership: Membership, role: str) -> Membership:
    """Change a member's role; the last owner of a tenant cannot stop being one."""
    if role not in Membership.Role.values:
        raise ValidationFailed(f"Role must be one of {', '.join(Membership.Role.values)}.", param="role")
    with transaction.atomic():
        owners = _lock_owners(membership.tenant)
        if membership.role == Membership.Role.OWNER and role != Membership.Role.OWNER and owners == [membership.pk]:
            raise Conflict("A workspace needs at least one owner: make someone else owner first.", param="role")
        Membership.objects.filter(pk=membership.pk).update(role=role)
    membership.role = role
    return membership


def membership_remove(*, membership: Membership) -> None:
    """Remove a member and every credential they made in the workspace: their API keys are
    revoked, their OAuth2 applications (and so those applications' tokens) deleted, and the
    tokens issued to them revoked. The last owner cannot be removed."""
    tenant = membership.tenant
    with transaction.atomic():
        owners = _lock_owners(tenant)
        if membership.role == Membership.Role.OWNER and owners == [membership.pk]:
            raise Conflict("A workspace needs at least one owner: make someone else owner first.", param="role")
        Membership.objects.filter(pk=membership.pk).delete()
        revoked = list(
            ApiKey.objects.filter(tenant=tenant, created_by_id=membership.user_id, revoked_at__isnull=True).values_list(
                "prefix", flat=True
            )
        )
        ApiKey.objects.filter(prefix__in=revoked).update(revoked_at=timezone.now())
        _oauth_credentials_delete(tenant=tenant, user_id=membership.user_id)
    for prefix in revoked:
        api_key_cache_invalidate(prefix)
        transaction.on_commit(functools.partial(api_key_cache_invalidate, prefix))


def _oauth_credentials_delete(*, tenant: Tenant, user_id: int) -> None:
    """A user's OAuth2 applications and tokens in ``tenant``'s schema (where their tables live)."""
    from django_tenants.utils import tenant_context
    from oauth2_provider.models import AccessToken, Application, Grant, IDToken, RefreshToken

    with tenant_context(tenant):
        applications = Application.objects.filter(user_id=user_id)
        for model in (AccessToken, RefreshToken, Grant, IDToken):
            model.objects.filter(application__in=applications).delete()
            model.objects.filter(user_id=user_id).delete()
        applications.delete()
