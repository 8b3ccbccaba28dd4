"""ChittyCan settings. Everything comes from the environment: see docs/configuration.md."""

from __future__ import annotations

from pathlib import Path

import dj_database_url

from chittycan.env import env_bool, env_choice, env_float, env_int, env_secret, env_str, secret_key_problem

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("CHITTYCAN_VAR_DIR", str(BASE_DIR / "var")))

# prod: route by configuration. dev: every model goes to Ollama (OLLAMA_BASE_URL) or the mock model.
CHITTYCAN_MODE = env_choice("CHITTYCAN_MODE", "prod", ("prod", "dev"))

_DEV_SECRET = "chittycan-insecure-development-secret-change-me"
SECRET_KEY = env_secret("SECRET_KEY", _DEV_SECRET)
# Outside dev mode the servers refuse to start while this says why SECRET_KEY is unfit
# (core/preflight.py): the development default, or too short to be a secret.
CHITTYCAN_SECRET_KEY_PROBLEM = "" if CHITTYCAN_MODE == "dev" else secret_key_problem(SECRET_KEY, _DEV_SECRET)
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [h.strip() for h in env_str("ALLOWED_HOSTS", "*").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in env_str("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]
# HTTPS hardening, as `manage.py check --deploy` (run by `can serve` in production) asks for it.
# Off by default so that a plain-HTTP local install works; see docs/deployment.md.
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]  # probes and scrapes call plain HTTP
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
# Behind a proxy that terminates TLS and sets X-Forwarded-Proto (and strips it from clients).
if env_bool("CHITTYCAN_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "daphne",
    "chittycan.apps.ChittyCanAdminConfig",  # django.contrib.admin with the OTP site (chittycan/admin_site.py)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "rest_framework",
    "channels",
    "tenants",
    "ledger",
    "budgets",
    "gateway",
    "billing_export",
    "control",
    "dashboard",
]
# daphne's AppConfig imports Twisted (~40 MiB resident) to install its reactor; only `runserver` and
# the daphne server need that, so `can serve` with uvicorn or granian leaves it out.
if env_str("CHITTYCAN_SERVING") in ("uvicorn", "granian"):
    INSTALLED_APPS.remove("daphne")

MIDDLEWARE = [
    "chittycan.middleware.RequestIdMiddleware",  # x-request-id on every /v1 answer Django gives
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "core.origin.OriginMiddleware",  # who and from where, for the audit log (docs/audit.md)
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "dashboard.security.DashboardHeadersMiddleware",  # CSP and friends on /dashboard/ (docs/dashboard.md)
]

ROOT_URLCONF = "chittycan.urls"
ASGI_APPLICATION = "chittycan.asgi.application"
WSGI_APPLICATION = "chittycan.wsgi.application"

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

# --- Databases -------------------------------------------------------------------------------
# Embedded default: SQLite under var/. Production: DATABASE_URL=postgres://...
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'chittycan.sqlite3'}")
# Health checks: a persistent connection is tested before reuse, so a database restart costs a
# reconnect, not failed requests (see core/dbsafe.py).
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        conn_max_age=env_int("DB_CONN_MAX_AGE", 60),
        conn_health_checks=env_bool("DB_CONN_HEALTH_CHECKS", True),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
_test_db = env_str("CHITTYCAN_TEST_DB_NAME")
if _test_db:
    DATABASES["default"]["TEST"] = {"NAME": _test_db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, cache, channels, celery ---------------------------------------------------------
# Empty REDIS_URL = embedded mode: in-process counters, cache and queues, eager Celery.
REDIS_URL = env_str("REDIS_URL", "")
REDIS_PREFIX = env_str("CHITTYCAN_REDIS_PREFIX", "cc")
# Connections each gateway process keeps to Redis, and how long a request waits for a free one
# (a request holds one for one command at a time, never while streaming; waiting for one is not
# an outage). docs/operations.md "Failure behaviour".
CHITTYCAN_REDIS_MAX_CONNECTIONS = env_int("CHITTYCAN_REDIS_MAX_CONNECTIONS", 256)
CHITTYCAN_REDIS_POOL_TIMEOUT = env_float("CHITTYCAN_REDIS_POOL_TIMEOUT", 10.0)
# The exact response cache (docs/caching.md): the largest answer it stores (bytes, as stored) and,
# in the embedded mode (no Redis), how many answers this process keeps (least recently used go).
CHITTYCAN_CACHE_MAX_BYTES = env_int("CHITTYCAN_CACHE_MAX_BYTES", 1_048_576)
CHITTYCAN_CACHE_MEMORY_ENTRIES = env_int("CHITTYCAN_CACHE_MEMORY_ENTRIES", 10_000)
# The semantic cache (docs/caching.md "Semantic cache"): how many stored prompts of one tenant,
# model and parameters an in-process search compares (the newest), and whether PostgreSQL's
# pgvector extension is used when it is available (auto) or never (off).
CHITTYCAN_SEMANTIC_MAX_ROWS = env_int("CHITTYCAN_SEMANTIC_MAX_ROWS", 1_000)
CHITTYCAN_SEMANTIC_PGVECTOR = env_str("CHITTYCAN_SEMANTIC_PGVECTOR", "auto")
# After a failed call, a PING on a connection of its own decides: this many consecutive failures,
# each with this timeout (seconds), mean Redis is down.
CHITTYCAN_REDIS_PROBE_TIMEOUT = env_float("CHITTYCAN_REDIS_PROBE_TIMEOUT", 0.5)
CHITTYCAN_REDIS_PROBE_FAILURES = env_int("CHITTYCAN_REDIS_PROBE_FAILURES", 3)

if REDIS_URL:
    # Keys under the deployment's prefix, as every other key of ours (several deployments, or test
    # runs, may share one Redis).
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_PREFIX}:asgi"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", "") or None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 300)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 360)
CELERY_TIMEZONE = "UTC"

# --- Auth, admin, 2FA ------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Staff must pass a TOTP second factor in the admin. Only an explicit development setting turns it off.
CHITTYCAN_ADMIN_REQUIRE_OTP = env_bool("CHITTYCAN_ADMIN_REQUIRE_OTP", True)
OTP_TOTP_ISSUER = "ChittyCan"

# --- Tenant dashboard (docs/dashboard.md) -------------------------------------------------------
# Staff need the second factor in the dashboard as in the admin; members of a tenant with
# "require OTP" set (on it or an ancestor) too; this asks it of every dashboard user.
CHITTYCAN_DASHBOARD_REQUIRE_OTP = env_bool("CHITTYCAN_DASHBOARD_REQUIRE_OTP", False)
# Sign-in throttle: this many failures per user name or client address within the window
# (seconds) and further attempts are refused until the window has passed.
CHITTYCAN_DASHBOARD_LOGIN_ATTEMPTS = env_int("CHITTYCAN_DASHBOARD_LOGIN_ATTEMPTS", 5)
CHITTYCAN_DASHBOARD_LOGIN_WINDOW = env_int("CHITTYCAN_DASHBOARD_LOGIN_WINDOW", 900)
LOGIN_URL = "dashboard:login"
# Single sign-on through OpenID Connect (dashboard/oidc.py, docs/dashboard.md): off unless an
# issuer's client id is set.
CHITTYCAN_OIDC_ENABLED = bool(env_str("OIDC_RP_CLIENT_ID", ""))
CHITTYCAN_OIDC_GROUPS_CLAIM = env_str("CHITTYCAN_OIDC_GROUPS_CLAIM", "groups")
# group=tenant-slug:role pairs, comma-separated (dashboard/oidc.py).
CHITTYCAN_OIDC_GROUP_ROLES = env_str("CHITTYCAN_OIDC_GROUP_ROLES", "")
if CHITTYCAN_OIDC_ENABLED:
    INSTALLED_APPS.append("mozilla_django_oidc")
    AUTHENTICATION_BACKENDS = [
        "django.contrib.auth.backends.ModelBackend",
        "dashboard.oidc.GroupRoleBackend",
    ]
    OIDC_RP_CLIENT_ID = env_str("OIDC_RP_CLIENT_ID")
    OIDC_RP_CLIENT_SECRET = env_secret("OIDC_RP_CLIENT_SECRET", "")
    OIDC_RP_SIGN_ALGO = env_str("OIDC_RP_SIGN_ALGO", "RS256")
    OIDC_RP_SCOPES = env_str("OIDC_RP_SCOPES", "openid email profile groups")
    OIDC_OP_AUTHORIZATION_ENDPOINT = env_str("OIDC_OP_AUTHORIZATION_ENDPOINT")
    OIDC_OP_TOKEN_ENDPOINT = env_str("OIDC_OP_TOKEN_ENDPOINT")
    OIDC_OP_USER_ENDPOINT = env_str("OIDC_OP_USER_ENDPOINT")
    OIDC_OP_JWKS_ENDPOINT = env_str("OIDC_OP_JWKS_ENDPOINT", "")
    OIDC_TIMEOUT = env_float("OIDC_TIMEOUT", 10.0)
    LOGIN_REDIRECT_URL = "/dashboard/"
    LOGIN_REDIRECT_URL_FAILURE = "/dashboard/login/"
    LOGOUT_REDIRECT_URL = "/dashboard/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# Static files (the admin's CSS and JS): `manage.py collectstatic` copies them to STATIC_ROOT at
# install (`make install`) and image build time; chittycan/staticfiles.py serves them with
# WhiteNoise in front of the ASGI app (content types, caching, ETags, gzip variants).
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("CHITTYCAN_STATIC_ROOT", str(VAR_DIR / "static")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Dev mode also serves straight from the apps' static directories (a checkout run without
# `make install`); what collectstatic copied wins. Production serves STATIC_ROOT only.
WHITENOISE_USE_FINDERS = CHITTYCAN_MODE == "dev"

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "chittycan@localhost")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "chittycan.logging.JsonFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        # httpx logs every upstream request at INFO: a JSON line per request on the hot path, which
        # cost about a third of the throughput at INFO. Failures are logged by dispatch instead.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        # One JSON line per request (docs/observability.md); CHITTYCAN_REQUEST_LOG=false silences it.
        "chittycan.requests": {"level": "INFO" if env_bool("CHITTYCAN_REQUEST_LOG", True) else "WARNING"},
    },
}

# --- Observability (docs/observability.md) ---------------------------------------------------
# GET /metrics: with a token, `Authorization: Bearer <token>` from anywhere; without, loopback only.
CHITTYCAN_METRICS_TOKEN = env_secret("CHITTYCAN_METRICS_TOKEN", "")
# The tenant slug as a label of the request, token and cost metrics (one series per tenant).
CHITTYCAN_METRICS_TENANT_LABEL = env_bool("CHITTYCAN_METRICS_TENANT_LABEL", False)
# At most this many budgets in chittycan_budget_utilisation_ratio (lowest ids first).
CHITTYCAN_METRICS_MAX_BUDGETS = env_int("CHITTYCAN_METRICS_MAX_BUDGETS", 200)
# OpenTelemetry traces (gateway/tracing.py), exported over OTLP/HTTP as the standard OTEL_* variables
# say. Off unless CHITTYCAN_TRACING=true, or unset with an OTLP endpoint set; OTEL_SDK_DISABLED=true
# or OTEL_TRACES_EXPORTER=none turn it off whatever the rest says.
_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env_str("OTEL_EXPORTER_OTLP_ENDPOINT")
CHITTYCAN_TRACING = (
    (env_bool("CHITTYCAN_TRACING") if env_str("CHITTYCAN_TRACING").strip() else bool(_OTLP_ENDPOINT))
    and not env_bool("OTEL_SDK_DISABLED", False)
    and env_str("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none"
)

# --- Gateway ---------------------------------------------------------------------------------
OLLAMA_BASE_URL = env_str("OLLAMA_BASE_URL", "")
CHITTYCAN_DEV_OLLAMA_MODEL = env_str("CHITTYCAN_DEV_OLLAMA_MODEL", "llama3.2")
# Dev mode serves the catalogue's models and aliases; any other name is a 404 as in production,
# unless this accepts every name (served by the mock or Ollama at $0).
CHITTYCAN_DEV_ACCEPT_ANY_MODEL = env_bool("CHITTYCAN_DEV_ACCEPT_ANY_MODEL", False)

# HMAC secret for API key hashes; defaults to SECRET_KEY. Changing it invalidates every key.
CHITTYCAN_KEY_SECRET = env_secret("CHITTYCAN_KEY_SECRET", SECRET_KEY)
# Fernet key material for provider credentials at rest; defaults to one derived from SECRET_KEY.
CHITTYCAN_ENCRYPTION_KEY = env_secret("CHITTYCAN_ENCRYPTION_KEY", "")

CHITTYCAN_MAX_BODY_BYTES = env_int("CHITTYCAN_MAX_BODY_BYTES", 32 * 1024 * 1024)
# The largest audio file /v1/audio/transcriptions takes (OpenAI's own limit is 25 MB): docs/media.md.
CHITTYCAN_MAX_AUDIO_BYTES = env_int("CHITTYCAN_MAX_AUDIO_BYTES", 25 * 1024 * 1024)
CHITTYCAN_AUTH_CACHE_TTL = env_float("CHITTYCAN_AUTH_CACHE_TTL", 30.0)
CHITTYCAN_ROUTES_TTL = env_float("CHITTYCAN_ROUTES_TTL", 30.0)
# Circuit breakers and the retry budget (docs/resilience.md): how long a process trusts the breaker
# state it read from Redis (seconds), and the share of a deployment's requests retries may add.
CHITTYCAN_BREAKER_CACHE_TTL = env_float("CHITTYCAN_BREAKER_CACHE_TTL", 1.0)
CHITTYCAN_RETRY_BUDGET_RATIO = env_float("CHITTYCAN_RETRY_BUDGET_RATIO", 0.2)
CHITTYCAN_RETRY_BUDGET_BURST = env_float("CHITTYCAN_RETRY_BUDGET_BURST", 10.0)
CHITTYCAN_UPSTREAM_CONNECT_TIMEOUT = env_float("CHITTYCAN_UPSTREAM_CONNECT_TIMEOUT", 5.0)
CHITTYCAN_UPSTREAM_TIMEOUT = env_float("CHITTYCAN_UPSTREAM_TIMEOUT", 600.0)
CHITTYCAN_UPSTREAM_MAX_RETRIES = env_int("CHITTYCAN_UPSTREAM_MAX_RETRIES", 2)
CHITTYCAN_HTTP_TRANSPORT = env_choice("CHITTYCAN_HTTP_TRANSPORT", "aiohttp", ("aiohttp", "httpx"))
CHITTYCAN_HTTP_MAX_CONNECTIONS = env_int("CHITTYCAN_HTTP_MAX_CONNECTIONS", 512)

# Passthrough: a request bearing a provider's own key (sk-...) is forwarded with it and metered
# under the passthrough tenant. Off by default.
CHITTYCAN_PASSTHROUGH = env_bool("CHITTYCAN_PASSTHROUGH", False)
CHITTYCAN_PASSTHROUGH_TENANT = env_str("CHITTYCAN_PASSTHROUGH_TENANT", "passthrough")
CHITTYCAN_PASSTHROUGH_PROVIDER = env_str("CHITTYCAN_PASSTHROUGH_PROVIDER", "openai")

# Usage ledger writer. A batch's rows, their decoded and column forms and the driver's buffers are
# all in memory at once: 500-row batches raised a busy gateway's peak memory by ~3 MiB over 100,
# for no measurable throughput (docs/benchmark.md).
CHITTYCAN_USAGE_BATCH_SIZE = env_int("CHITTYCAN_USAGE_BATCH_SIZE", 100)
CHITTYCAN_USAGE_FLUSH_INTERVAL = env_float("CHITTYCAN_USAGE_FLUSH_INTERVAL", 0.2)
CHITTYCAN_USAGE_SPOOL_DIR = Path(env_str("CHITTYCAN_USAGE_SPOOL_DIR", str(VAR_DIR / "spool")))
CHITTYCAN_USAGE_RETENTION_DAYS = env_int("CHITTYCAN_USAGE_RETENTION_DAYS", 90)
# Audit rows older than this are pruned by the prune task (docs/audit.md); a system check refuses
# less than the billing export's window.
CHITTYCAN_AUDIT_RETENTION_DAYS = env_int("CHITTYCAN_AUDIT_RETENTION_DAYS", 90)
# Responses API answers the gateway stores (GET /v1/responses/{id}, previous_response_id): kept
# this many days, then pruned with the usage rows (docs/responses.md).
CHITTYCAN_RESPONSES_RETENTION_DAYS = env_int("CHITTYCAN_RESPONSES_RETENTION_DAYS", 30)
# Writer retries while the database is down: exponential backoff from BASE up to MAX seconds.
CHITTYCAN_USAGE_RETRY_BASE = env_float("CHITTYCAN_USAGE_RETRY_BASE", 0.25)
CHITTYCAN_USAGE_RETRY_MAX = env_float("CHITTYCAN_USAGE_RETRY_MAX", 30.0)
CHITTYCAN_USAGE_SPOOL_REPLAY_INTERVAL = env_float("CHITTYCAN_USAGE_SPOOL_REPLAY_INTERVAL", 30.0)
# Each process journals the rows it hands off; one still missing from the ledger after this many
# seconds (the Redis stream lost it) is written from the journal (ledger/writer.py).
CHITTYCAN_USAGE_JOURNAL_GRACE = env_float("CHITTYCAN_USAGE_JOURNAL_GRACE", 5.0)
# Rows another writer read but did not acknowledge for this long are taken over (it crashed).
CHITTYCAN_USAGE_CLAIM_IDLE_MS = env_int("CHITTYCAN_USAGE_CLAIM_IDLE_MS", 60_000)
# Budget alerts: webhook timeout and where links in alert emails point.
CHITTYCAN_ALERT_WEBHOOK_TIMEOUT = env_float("CHITTYCAN_ALERT_WEBHOOK_TIMEOUT", 10.0)

# Periodic jobs (celery beat). See docs/usage-and-analytics.md.
CELERY_BEAT_SCHEDULE = {
    "usage-rollup": {"task": "gateway.tasks.rollup_usage", "schedule": 300.0},
    "usage-prune": {"task": "gateway.tasks.prune_usage", "schedule": 3600.0},
    "usage-spool-replay": {"task": "gateway.tasks.replay_usage_spool", "schedule": 60.0},
    "budget-alerts": {"task": "gateway.tasks.check_budget_alerts", "schedule": 60.0},
}

# Budgets and rate limits (docs/budgets.md). When Redis is unreachable: "refuse" answers 503 with
# retry-after; "degrade" enforces budgets in PostgreSQL alone and rate limits per process.
CHITTYCAN_REDIS_FAILURE_POLICY = env_choice("CHITTYCAN_REDIS_FAILURE_POLICY", "refuse", ("refuse", "degrade"))
CHITTYCAN_REDIS_RETRY_AFTER = env_int("CHITTYCAN_REDIS_RETRY_AFTER", 5)
# A reservation's lease (renewed while its request runs); a crashed process's expire after it.
CHITTYCAN_RESERVATION_LEASE = env_float("CHITTYCAN_RESERVATION_LEASE", 120.0)
CHITTYCAN_RESERVATION_SWEEP_INTERVAL = env_float("CHITTYCAN_RESERVATION_SWEEP_INTERVAL", 5.0)
# How often Celery beat runs the budget reconciler (seconds).
CHITTYCAN_RECONCILE_INTERVAL = env_float("CHITTYCAN_RECONCILE_INTERVAL", 300.0)
CELERY_BEAT_SCHEDULE["budget-reconcile"] = {
    "task": "tenants.reconcile_budgets",
    "schedule": CHITTYCAN_RECONCILE_INTERVAL,
}
CELERY_BEAT_SCHEDULE["budget-sweep"] = {"task": "tenants.sweep_reservations", "schedule": 60.0}
# Active health probes (docs/resilience.md): each run probes the deployments whose provider's
# probe interval has passed, so this tick is the shortest interval a provider can ask for.
CHITTYCAN_PROBE_TICK = env_float("CHITTYCAN_PROBE_TICK", 5.0)
CELERY_BEAT_SCHEDULE["provider-probes"] = {"task": "gateway.tasks.probe_providers", "schedule": CHITTYCAN_PROBE_TICK}
# Routing experiments with auto-promotion: how often their winners are looked for (docs/routing.md).
CHITTYCAN_EXPERIMENT_INTERVAL = env_float("CHITTYCAN_EXPERIMENT_INTERVAL", 300.0)
CELERY_BEAT_SCHEDULE["experiment-auto-promote"] = {
    "task": "gateway.tasks.auto_promote_experiments",
    "schedule": CHITTYCAN_EXPERIMENT_INTERVAL,
}

CHITTYCAN_SERVER = env_choice("CHITTYCAN_SERVER", "uvicorn", ("uvicorn", "granian", "daphne"))
# gc.freeze() once the app is built and after warm-up: full collections skip start-up objects.
CHITTYCAN_GC_FREEZE = env_bool("CHITTYCAN_GC_FREEZE", True)

# --- Stripe export (docs/billing-export.md) ---------------------------------------------------
CHITTYCAN_STRIPE_METER_EVENT = env_str("CHITTYCAN_STRIPE_METER_EVENT", "llm_cost_microusd")
CHITTYCAN_STRIPE_AGGREGATION = env_choice("CHITTYCAN_STRIPE_AGGREGATION", "day", ("day", "hour", "request"))
CHITTYCAN_STRIPE_CUSTOMER_KEY = env_str("CHITTYCAN_STRIPE_CUSTOMER_KEY", "stripe_customer_id")
CHITTYCAN_STRIPE_VALUE_KEY = env_str("CHITTYCAN_STRIPE_VALUE_KEY", "value")
CHITTYCAN_STRIPE_IDENTIFIER_PREFIX = env_str("CHITTYCAN_STRIPE_IDENTIFIER_PREFIX", "cc")
CHITTYCAN_STRIPE_CSV_MAX_BYTES = env_int("CHITTYCAN_STRIPE_CSV_MAX_BYTES", 4_900_000)
CHITTYCAN_STRIPE_API_KEY = env_secret("CHITTYCAN_STRIPE_API_KEY", "")
CHITTYCAN_STRIPE_API_BASE = env_str("CHITTYCAN_STRIPE_API_BASE", "https://api.stripe.com")
CHITTYCAN_STRIPE_TIMEOUT = env_float("CHITTYCAN_STRIPE_TIMEOUT", 30.0)
CHITTYCAN_STRIPE_MAX_NETWORK_RETRIES = env_int("CHITTYCAN_STRIPE_MAX_NETWORK_RETRIES", 2)
# Hourly: export yesterday and push unaccepted lines (billing_export.tasks). Off: export by hand.
CHITTYCAN_STRIPE_AUTO_PUSH = env_bool("CHITTYCAN_STRIPE_AUTO_PUSH", False)
if CHITTYCAN_STRIPE_AUTO_PUSH:
    CELERY_BEAT_SCHEDULE["stripe-export"] = {"task": "billing_export.tasks.export_and_push", "schedule": 3600.0}

# --- Egress policy (docs/security.md) ---------------------------------------------------------
# Stored URLs the gateway calls (budget webhooks, provider base URLs) may not reach loopback,
# private, link-local, CGNAT, multicast or metadata addresses unless named here: comma-separated
# host names, addresses and CIDRs, e.g. "127.0.0.1,localhost,10.0.5.0/24". A named destination
# may also be reached over http in production (elsewhere production requires https).
CHITTYCAN_EGRESS_ALLOW = env_str("CHITTYCAN_EGRESS_ALLOW", "")
