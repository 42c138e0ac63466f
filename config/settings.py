"""Parley settings: one module, configured from environment variables (12-factor).

Every variable is documented in docs/configuration.md. ``PARLEY_ENV`` selects the small per-environment
differences (development, test, production). When ``DATABASE_URL`` / ``REDIS_URL`` are unset the
embedded PostgreSQL (pgserver) and a local redis-server are used.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

ENVIRONMENT = env.str("PARLEY_ENV", default="development")
if ENVIRONMENT not in {"development", "test", "production"}:
    raise ValueError(f"PARLEY_ENV must be development, test or production, not {ENVIRONMENT!r}")
IS_PRODUCTION = ENVIRONMENT == "production"
IS_TEST = ENVIRONMENT == "test"

DEBUG = env.bool("DJANGO_DEBUG", default=ENVIRONMENT == "development")
if IS_PRODUCTION:
    SECRET_KEY = env.str("DJANGO_SECRET_KEY")
else:
    # Development and test only: a fixed key is fine because nothing real is signed with it.
    SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="parley-insecure-development-key-do-not-use-in-production")

PARLEY_BASE_DOMAIN = env.str("PARLEY_BASE_DOMAIN", default="localhost")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=[PARLEY_BASE_DOMAIN, f".{PARLEY_BASE_DOMAIN}", "127.0.0.1"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
PARLEY_PUBLIC_URL = env.str("PARLEY_PUBLIC_URL", default="http://localhost:8000")

# --- applications -------------------------------------------------------------------------------

SHARED_APPS = [
    "django_tenants",
    "tenants",
    "billing",
    "daphne",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI's assets served from our own static files: /api/docs/ works without internet.
    "drf_spectacular_sidecar",
    "channels",
    "axes",
    "django_structlog",
    # Also shared (empty in public) so that deleting a user, a public row, can look for its
    # tokens there; tenants' applications and tokens live in their own schemas.
    "oauth2_provider",
]
TENANT_APPS = [
    "django.contrib.contenttypes",
    "oauth2_provider",
    "chat",
    "knowledge",
]
INSTALLED_APPS = list(SHARED_APPS) + [app for app in TENANT_APPS if app not in SHARED_APPS]

TENANT_MODEL = "tenants.Tenant"
TENANT_DOMAIN_MODEL = "tenants.Domain"
AUTH_USER_MODEL = "tenants.User"
# New tenant schemas are cloned from this fully-migrated template: constant-time provisioning
# however many migrations accumulate (see tenants.services.tenant_create).
TENANT_BASE_SCHEMA = "tenant_template"
PUBLIC_SCHEMA_URLCONF = "config.urls_public"
ROOT_URLCONF = "config.urls_tenants"
SHOW_PUBLIC_IF_NO_TENANT_FOUND = True
DATABASE_ROUTERS = ["django_tenants.routers.TenantSyncRouter"]
# Set search_path only when the schema changes, not before every statement (halves the statements
# per request, measured in tests/perf). Safe with pooled connections: closing the wrapper forgets
# the path, so every checkout sets it again.
TENANT_LIMIT_SET_CALLS = True

MIDDLEWARE = [
    "tenants.middleware.HealthCheckMiddleware",
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin site, widget) from every web replica, without a separate server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Tenant first so that every log line of the request, request_started included, names it.
    "tenants.middleware.TenantResolutionMiddleware",
    "django_structlog.middlewares.RequestMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Sync-only, so last: in the middle of the stack it put every later middleware in async
    # mode with a thread hop each (measured: 1.2 ms a request). Laziness keeps it correct here.
    "tenants.middleware.TenantMembershipMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "config.asgi.application"

# --- data stores --------------------------------------------------------------------------------

if env.str("DATABASE_URL", default=""):
    DATABASES = {"default": env.db_url("DATABASE_URL")}
    # Unix-socket URLs, in either libpq form: postgres://u@%2Frun%2Fpg/db or postgres://u@/db?host=/run/pg
    from urllib.parse import unquote

    DATABASES["default"]["HOST"] = unquote(DATABASES["default"].get("HOST") or "") or (
        DATABASES["default"].get("OPTIONS", {}).pop("host", "")
    )
else:
    from config.embedded import ensure_postgres

    _embedded_pg = ensure_postgres()
    DATABASES = {
        "default": {"NAME": _embedded_pg.name, "USER": _embedded_pg.user, "HOST": _embedded_pg.host, "PORT": ""}
    }
    # pgserver's own pg_dump matches its server version (captures the tenant template's DDL).
    from pgserver._commands import POSTGRES_BIN_PATH

    _default_pg_dump = str(POSTGRES_BIN_PATH / "pg_dump")
if env.str("DATABASE_URL", default=""):
    import shutil

    _default_pg_dump = shutil.which("pg_dump") or ""
PARLEY_PG_DUMP = env.str("PARLEY_PG_DUMP", default=_default_pg_dump)
DATABASES["default"]["ENGINE"] = "django_tenants.postgresql_backend"
# django-tenants wraps the real backend; django-prometheus instruments it (both want ENGINE).
ORIGINAL_BACKEND = "django_prometheus.db.backends.postgresql"
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
# A connection pool per process (psycopg_pool): under ASGI every request runs on a fresh thread,
# and without a pool each one opened a new PostgreSQL connection (a backend fork, ~10 ms of CPU).
# django-tenants sets the search_path on the first cursor of every checkout, so pooled
# connections never carry one tenant's schema into another's request.
# Off in tests by default: test-database setup switches the database name after connecting.
# The embedded PostgreSQL allows 100 connections: keep processes times max_size under it.
DATABASE_POOL_MAX_SIZE = env.int("DATABASE_POOL_MAX_SIZE", default=0 if IS_TEST else 10)
if DATABASE_POOL_MAX_SIZE:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=1),
        "max_size": DATABASE_POOL_MAX_SIZE,
        "timeout": env.float("DATABASE_POOL_TIMEOUT_SECONDS", default=10.0),
    }
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("TEST", {})["NAME"] = env.str("DATABASE_TEST_NAME", default="parley_test")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if env.str("REDIS_URL", default=""):
    REDIS_URL = env.str("REDIS_URL")
else:
    from config.embedded import ensure_redis

    REDIS_URL = ensure_redis()
if IS_TEST:
    # Tests use their own logical database so they never touch development data.
    REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/" + env.str("REDIS_TEST_DB", default="9")
# Connections per Redis pool (one sync and one asyncio pool per process); past it callers wait.
REDIS_MAX_CONNECTIONS = env.int("REDIS_MAX_CONNECTIONS", default=200)

CACHES = {
    "default": {
        "BACKEND": "config.cache.SharedPoolRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "parley",
        "TIMEOUT": 300,
    }
}
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "parley:channels"},
    }
}

# --- Celery -------------------------------------------------------------------------------------

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BEAT_SCHEDULE: dict = {
    "knowledge-requeue-stalled": {"task": "knowledge.tasks.documents_requeue_stalled_task", "schedule": 60.0},
    # Usage stream → PostgreSQL; a run that waited 10 s in the queue is dropped (the next does its work).
    "billing-usage-flush": {"task": "billing.tasks.usage_flush_task", "schedule": 2.0, "options": {"expires": 10}},
    "billing-budget-reservations-expire": {"task": "billing.tasks.budget_reservations_expire_task", "schedule": 60.0},
    "billing-invoices-issue": {"task": "billing.tasks.invoices_issue_task", "schedule": 3600.0},
    # Message stream → PostgreSQL; a run that waited 10 s in the queue is dropped (the next does its work).
    "chat-messages-flush": {
        "task": "chat.tasks.messages_flush_task",
        "schedule": env.float("PARLEY_MESSAGE_FLUSH_SECONDS", default=1.0),
        "options": {"expires": 10},
    },
    "chat-conversations-purge": {"task": "chat.tasks.conversations_purge_task", "schedule": 3600.0},
}

# --- gateway ------------------------------------------------------------------------------------

# Per end user (widget visitor, signed-in user, an API caller's own ``user``) unless a bot sets its own.
PARLEY_END_USER_REQUESTS_PER_MINUTE = env.int("PARLEY_END_USER_REQUESTS_PER_MINUTE", default=30)
PARLEY_END_USER_TOKENS_PER_MINUTE = env.int("PARLEY_END_USER_TOKENS_PER_MINUTE", default=60_000)
# The completion part of a turn's token estimate when neither the request nor the bot sets max_tokens.
PARLEY_DEFAULT_MAX_TOKENS_ESTIMATE = env.int("PARLEY_DEFAULT_MAX_TOKENS_ESTIMATE", default=512)
# API-key authentication failures per key prefix and client address (brute force), then refused.
PARLEY_AUTH_FAILURE_LIMIT = env.int("PARLEY_AUTH_FAILURE_LIMIT", default=20)
PARLEY_AUTH_FAILURE_WINDOW_SECONDS = env.int("PARLEY_AUTH_FAILURE_WINDOW_SECONDS", default=300)

# --- conversation memory ------------------------------------------------------------------------

# Recent messages kept per conversation in the Redis hot store (50 turns).
PARLEY_HOT_STORE_MESSAGES = env.int("PARLEY_HOT_STORE_MESSAGES", default=100)
# Default retention of idle conversations (a tenant's own setting overrides it).
PARLEY_CONVERSATION_RETENTION_DAYS = env.int("PARLEY_CONVERSATION_RETENTION_DAYS", default=90)
# Batched persistence: the flusher's period, its batch size, and how long a dead flusher's batch
# stays pending before another flusher claims it.
PARLEY_MESSAGE_FLUSH_SECONDS = env.float("PARLEY_MESSAGE_FLUSH_SECONDS", default=1.0)
PARLEY_MESSAGE_FLUSH_BATCH = env.int("PARLEY_MESSAGE_FLUSH_BATCH", default=1_000)
PARLEY_MESSAGE_CLAIM_IDLE_SECONDS = env.float("PARLEY_MESSAGE_CLAIM_IDLE_SECONDS", default=30.0)
# Conversations deleted per statement by the retention purge (short transactions, no long locks).
PARLEY_RETENTION_PURGE_BATCH = env.int("PARLEY_RETENTION_PURGE_BATCH", default=500)

# --- billing ------------------------------------------------------------------------------------

PARLEY_BILLING_PROVIDER = env.str("PARLEY_BILLING_PROVIDER", default="parley")
# HMAC secret of the billing provider's webhook; empty: the webhook accepts nothing (503).
PARLEY_BILLING_WEBHOOK_SECRET = env.str("PARLEY_BILLING_WEBHOOK_SECRET", default="")
PARLEY_BILLING_WEBHOOK_TOLERANCE_SECONDS = env.int("PARLEY_BILLING_WEBHOOK_TOLERANCE_SECONDS", default=300)
# Usage stream cap (entries, approximate): only reached if the flusher stops (~12 h of 20 req/s).
BILLING_USAGE_STREAM_MAXLEN = env.int("PARLEY_USAGE_STREAM_MAXLEN", default=1_000_000)
BILLING_USAGE_CLAIM_IDLE_SECONDS = env.int("PARLEY_USAGE_CLAIM_IDLE_SECONDS", default=60)
BILLING_BUDGET_ALERT_THRESHOLDS = env.list("PARLEY_BUDGET_ALERT_THRESHOLDS", cast=int, default=[80, 100])
BILLING_RESERVATION_STALE_SECONDS = env.int("PARLEY_RESERVATION_STALE_SECONDS", default=900)

# --- knowledge ----------------------------------------------------------------------------------

# Chunks are sized in the bundled embedder's real tokens (its max_seq_length is 256).
KNOWLEDGE_CHUNK_TOKENS = env.int("KNOWLEDGE_CHUNK_TOKENS", default=200)
KNOWLEDGE_CHUNK_OVERLAP = env.int("KNOWLEDGE_CHUNK_OVERLAP", default=40)
KNOWLEDGE_MAX_PAGES = env.int("KNOWLEDGE_MAX_PAGES", default=5000)
KNOWLEDGE_FETCH_TIMEOUT_SECONDS = env.float("KNOWLEDGE_FETCH_TIMEOUT_SECONDS", default=20.0)
# "host:port" pairs a URL document may point to although they are not public (intranet sources).
KNOWLEDGE_FETCH_ALLOWED_HOSTS = env.list("KNOWLEDGE_FETCH_ALLOWED_HOSTS", default=[])
# One ingestion's time limits: at the soft one the document fails (a crafted file would only hit it
# again), at the hard one the worker process is killed. Above a large PDF's honest processing time.
KNOWLEDGE_INGEST_SOFT_TIME_LIMIT_SECONDS = env.int("KNOWLEDGE_INGEST_SOFT_TIME_LIMIT_SECONDS", default=600)
KNOWLEDGE_INGEST_TIME_LIMIT_SECONDS = env.int(
    "KNOWLEDGE_INGEST_TIME_LIMIT_SECONDS", default=KNOWLEDGE_INGEST_SOFT_TIME_LIMIT_SECONDS + 60
)
# A document with no heartbeat for this long while queued/processing is handed to another worker.
KNOWLEDGE_STALLED_SECONDS = env.int("KNOWLEDGE_STALLED_SECONDS", default=300)
# HNSW candidate list size for retrieval (recall vs latency; see the retrieval benchmark).
KNOWLEDGE_HNSW_EF_SEARCH = env.int("KNOWLEDGE_HNSW_EF_SEARCH", default=100)
# Up to this many chunks in the searched scope, vector search is exact (a filtered scan beats a
# post-filtered approximate one, and is perfectly accurate).
KNOWLEDGE_EXACT_SEARCH_MAX_CHUNKS = env.int("KNOWLEDGE_EXACT_SEARCH_MAX_CHUNKS", default=2_000)
# CPU threads of the local embedder (unset: torch's default, one per core).
KNOWLEDGE_EMBED_THREADS = env.int("KNOWLEDGE_EMBED_THREADS", default=0) or None
KNOWLEDGE_QUERY_EMBEDDING_CACHE_SECONDS = env.int("KNOWLEDGE_QUERY_EMBEDDING_CACHE_SECONDS", default=86_400)

# --- auth ---------------------------------------------------------------------------------------

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if IS_TEST:
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# Login throttling: failures counted in Redis (no table), per username+IP, and per IP across
# usernames with a higher limit (credential stuffing; tenants/login_throttle.py).
AXES_HANDLER = "tenants.login_throttle.AddressAwareAxesHandler"
PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT = env.int("PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT", default=20)
AXES_FAILURE_LIMIT = env.int("PARLEY_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("PARLEY_LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_USERNAME_FORM_FIELD = "username"
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "tenants.views.lockout"
AXES_VERBOSE = False

EMAIL_BACKEND = env.str(
    "DJANGO_EMAIL_BACKEND",
    default="django.core.mail.backends.smtp.EmailBackend"
    if IS_PRODUCTION
    else "django.core.mail.backends.console.EmailBackend",
)
DEFAULT_FROM_EMAIL = env.str("DJANGO_DEFAULT_FROM_EMAIL", default="Parley <no-reply@localhost>")
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=env.int("PARLEY_JWT_ACCESS_MINUTES", default=15)),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=env.int("PARLEY_JWT_REFRESH_DAYS", default=7)),
    "SIGNING_KEY": env.str("PARLEY_JWT_SIGNING_KEY", default=SECRET_KEY),
    "AUTH_HEADER_TYPES": ("Bearer",),
    "USER_ID_CLAIM": "user_id",
    "UPDATE_LAST_LOGIN": False,
}

# OAuth2 provider tables live in each tenant schema: applications and tokens are per tenant.
OAUTH2_PROVIDER = {
    "PKCE_REQUIRED": True,
    "SCOPES": {
        "chat": "Chat with the tenant's bots",
        "knowledge:read": "Read knowledge bases",
        "knowledge:write": "Upload and delete documents",
        "admin": "Administer the tenant",
    },
    "DEFAULT_SCOPES": ["chat"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": 3600,
    "ALLOWED_REDIRECT_URI_SCHEMES": ["https"] if IS_PRODUCTION else ["http", "https"],
}

# Networks (CIDR) and host names that tenant-configured model servers, vLLM pools, embedders and
# rerankers may reach although they are not public (tenants.outbound): self-hosted model servers.
# Development and tests list loopback, where the mock model server runs; production lists nothing.
PARLEY_OUTBOUND_ALLOWLIST = env.list(
    "PARLEY_OUTBOUND_ALLOWLIST", default=[] if IS_PRODUCTION else ["127.0.0.0/8", "::1/128", "localhost"]
)

# Secret mixed into API-key hashes so that a leaked table alone cannot be used offline. Its own
# setting in production: rotating a leaked SECRET_KEY must not silently invalidate every API key.
MIN_API_KEY_PEPPER_LENGTH = 32
if IS_PRODUCTION:
    PARLEY_API_KEY_PEPPER = env.str("PARLEY_API_KEY_PEPPER", default="")
    if len(PARLEY_API_KEY_PEPPER) < MIN_API_KEY_PEPPER_LENGTH or PARLEY_API_KEY_PEPPER == SECRET_KEY:
        raise ImproperlyConfigured(
            f"PARLEY_API_KEY_PEPPER must be set in production: at least {MIN_API_KEY_PEPPER_LENGTH} characters, "
            "and not DJANGO_SECRET_KEY (see docs/security.md)."
        )
else:
    # Tests use a pepper of their own, so that processes they start with production settings pass
    # the check above; development keeps the secret key, which its stored demo keys were made with.
    PARLEY_API_KEY_PEPPER = env.str(
        "PARLEY_API_KEY_PEPPER", default="parley-test-pepper-not-the-secret-key-0123456789" if IS_TEST else SECRET_KEY
    )
PARLEY_RESOLUTION_CACHE_SECONDS = env.int("PARLEY_RESOLUTION_CACHE_SECONDS", default=300)
# POST /v1/chat/completions with an API key served at the ASGI edge, before Django
# (chat.transports.openai_edge); False sends it through Django's view like every other request.
PARLEY_OPENAI_EDGE = env.bool("PARLEY_OPENAI_EDGE", default=True)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.authentication.ApiKeyAuthentication",
        "tenants.authentication.TenantJWTAuthentication",
        "tenants.authentication.TenantOAuth2Authentication",
        "tenants.authentication.TenantSessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["tenants.json_input.BoundedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "tenants.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "tenants.schema.ParleyAutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Parley API",
    "DESCRIPTION": "Multi-tenant LLM chatbot platform. Authenticate with `Authorization: Bearer <API key>`.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No validator badge: Swagger UI would send the schema to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    # List envelopes and every operation's errors (tenants.schema.postprocess_api_conventions).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "tenants.schema.postprocess_api_conventions",
    ],
    "ENUM_NAME_OVERRIDES": {
        "ScopeEnum": "tenants.models.ApiKey.Scope",
        "MessageRoleEnum": "chat.models.Message.Role",
    },
}

# --- chat providers -------------------------------------------------------------------------------

# The built-in extractive responder streams word by word at a model-like pace (none in tests).
CHAT_LOCAL_SECONDS_PER_WORD = env.float("PARLEY_LOCAL_SECONDS_PER_WORD", default=0.0 if IS_TEST else 0.03)
CHAT_PROVIDER_TIMEOUT_SECONDS = env.float("PARLEY_PROVIDER_TIMEOUT_SECONDS", default=30.0)
CHAT_CIRCUIT_FAILURE_THRESHOLD = env.int("PARLEY_CIRCUIT_FAILURE_THRESHOLD", default=5)
CHAT_CIRCUIT_COOLDOWN_SECONDS = env.float("PARLEY_CIRCUIT_COOLDOWN_SECONDS", default=30.0)
# How long a process trusts a circuit it last saw closed before asking Redis again.
CHAT_CIRCUIT_CACHE_SECONDS = env.float("PARLEY_CIRCUIT_CACHE_SECONDS", default=1.0)

# Request bodies: JSON endpoints are small; uploads have their own plan-based limit.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("PARLEY_MAX_BODY_BYTES", default=1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

# --- security -----------------------------------------------------------------------------------

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = IS_PRODUCTION
CSRF_COOKIE_SECURE = IS_PRODUCTION
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if IS_PRODUCTION else None
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# --- static, i18n -------------------------------------------------------------------------------

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if IS_PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not IS_PRODUCTION
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- logging ------------------------------------------------------------------------------------

LOG_FORMAT = env.str("PARLEY_LOG_FORMAT", default="json" if IS_PRODUCTION else "console")
LOG_LEVEL = env.str("PARLEY_LOG_LEVEL", default="WARNING" if IS_TEST else "INFO")
from config.logging import build_logging_config  # noqa: E402

LOGGING = build_logging_config(log_format=LOG_FORMAT, level=LOG_LEVEL)
DJANGO_STRUCTLOG_CELERY_ENABLED = True

PROMETHEUS_EXPORT_MIGRATIONS = False

MEDIA_ROOT = env.path("PARLEY_MEDIA_ROOT", default=BASE_DIR / "var" / "media")

# --- embeddable widget --------------------------------------------------------------------------

# Lifetime of a widget's signed visitor token (the widget fetches a new one when it expires).
PARLEY_WIDGET_TOKEN_SECONDS = env.int("PARLEY_WIDGET_TOKEN_SECONDS", default=15 * 60)
# Token exchanges per minute: per visitor id, and per client address (which bounds how many
# visitor ids one address can mint). Messages per minute per client address, on top of the
# gateway's per-visitor limits.
PARLEY_WIDGET_SESSIONS_PER_VISITOR_PER_MINUTE = env.int("PARLEY_WIDGET_SESSIONS_PER_VISITOR_PER_MINUTE", default=10)
PARLEY_WIDGET_SESSIONS_PER_IP_PER_MINUTE = env.int("PARLEY_WIDGET_SESSIONS_PER_IP_PER_MINUTE", default=60)
PARLEY_WIDGET_MESSAGES_PER_IP_PER_MINUTE = env.int("PARLEY_WIDGET_MESSAGES_PER_IP_PER_MINUTE", default=120)
# Load balancers in front of the web replicas that append to X-Forwarded-For: the client address
# for the per-address limits is the entry this many hops from the right (0: REMOTE_ADDR itself;
# behind one load balancer every visitor would otherwise share its address).
PARLEY_WIDGET_TRUSTED_PROXY_HOPS = env.int("PARLEY_WIDGET_TRUSTED_PROXY_HOPS", default=0)
# How long browsers may cache a widget endpoint's CORS preflight answer.
PARLEY_WIDGET_PREFLIGHT_MAX_AGE = env.int("PARLEY_WIDGET_PREFLIGHT_MAX_AGE", default=3600)
