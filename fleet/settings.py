"""Fleetkeeper settings: one file, read from the environment (django-environ).

Two modes, chosen by FLEET_ENV:
- ``dev`` (default): SQLite and generated secrets under ``var/``; what ``make run`` uses.
- ``production``: every secret must come from the environment; nothing has a default.
"""

import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

FLEET_ENV = env.str("FLEET_ENV", default="dev")
if FLEET_ENV not in {"dev", "production"}:
    raise ImproperlyConfigured(f"FLEET_ENV must be 'dev' or 'production', not {FLEET_ENV!r}")
PRODUCTION = FLEET_ENV == "production"

VAR_DIR = Path(env.str("FLEET_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def dev_secret(name: str, nbytes: int = 32) -> str:
    """A secret generated once into var/ for development; production must set it in the environment."""
    if PRODUCTION:
        raise ImproperlyConfigured(f"{name} must be set in the environment when FLEET_ENV=production")
    path = VAR_DIR / "secrets" / name.lower()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()


SECRET_KEY = env.str("SECRET_KEY", default="") or dev_secret("SECRET_KEY", 50)
DEBUG = env.bool("DEBUG", default=not PRODUCTION)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[] if PRODUCTION else ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "devices",
    "security",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "security.audit.AuditContextMiddleware",
]

ROOT_URLCONF = "fleet.urls"
WSGI_APPLICATION = "fleet.wsgi.application"

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
                "fleet.context_processors.fleet",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web process read while a worker writes; the timeout rides out short write locks.
    # IMMEDIATE transactions take the write lock at BEGIN: a deferred transaction that reads and then writes
    # fails at once with "database is locked" when another process (worker, consumer) wrote in between,
    # instead of waiting for the lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "overview"
LOGOUT_REDIRECT_URL = "login"

# --- Security headers: strict in production, relaxed only for plain-HTTP local development.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=PRODUCTION)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=PRODUCTION)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=PRODUCTION)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=PRODUCTION)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=PRODUCTION)
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("BEHIND_TLS_PROXY", default=PRODUCTION) else None
)
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
# Behind a reverse proxy that sets X-Forwarded-For (docker-compose's Caddy), the audit log records the client's
# address from it; never turn this on when clients can reach the web server directly (they could forge it).
AUDIT_TRUST_X_FORWARDED_FOR = env.bool("AUDIT_TRUST_X_FORWARDED_FOR", default=False)

# --- Redis and Celery
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:16379/0")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
# No result backend by default: every task records its outcome in a database row (outbox, import job), and
# Celery's Redis result backend makes a publish block ~20 s and then fail for the life of the process when
# Redis blips. Set CELERY_RESULT_BACKEND only if you need task results.
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default="") or None
CELERY_TASK_IGNORE_RESULT = CELERY_RESULT_BACKEND is None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A publish to a Redis that is down should fail fast and visibly, not hang a web request.
CELERY_BROKER_TRANSPORT_OPTIONS = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5}
CELERY_TASK_TRACK_STARTED = True

# --- The fleet
FLEET_CLIENT_ID_PREFIX = env.str("FLEET_CLIENT_ID_PREFIX", default="device-")
# The part after the prefix. It never admits MQTT wildcards, '/', '$' or whitespace.
FLEET_CLIENT_ID_SUFFIX_PATTERN = env.str("FLEET_CLIENT_ID_SUFFIX_PATTERN", default=r"[A-Za-z0-9_-]{1,64}")
FLEET_PAGE_SIZE = env.int("FLEET_PAGE_SIZE", default=50)
FLEET_RECENTLY_SEEN_MINUTES = env.int("FLEET_RECENTLY_SEEN_MINUTES", default=15)
FLEET_IMPORT_MAX_BYTES = env.int("FLEET_IMPORT_MAX_BYTES", default=50 * 1024 * 1024)

# --- MQTT broker (Mosquitto), used from the broker-enforcement work on.
MQTT_HOST = env.str("MQTT_HOST", default="127.0.0.1")
MQTT_PORT = env.int("MQTT_PORT", default=18830)
MQTT_TLS_PORT = env.int("MQTT_TLS_PORT", default=18883)
MQTT_PUBLIC_HOST = env.str("MQTT_PUBLIC_HOST", default=MQTT_HOST)
MQTT_TOPIC_RX_PREFIX = env.str("MQTT_TOPIC_RX_PREFIX", default="rx")
MQTT_TOPIC_TX_PREFIX = env.str("MQTT_TOPIC_TX_PREFIX", default="tx")
MQTT_MAX_PACKET_SIZE = env.int("MQTT_MAX_PACKET_SIZE", default=64 * 1024)
MQTT_BROKER_DIR = Path(env.str("MQTT_BROKER_DIR", default=str(VAR_DIR / "mosquitto")))
# Which adapter enforces the policy (design.md, "Broker adapters"); MosquittoFiles renders the files and reloads.
MQTT_BROKER_ADAPTER = env.str("MQTT_BROKER_ADAPTER", default="security.brokers.files.MosquittoFiles")
# The user Mosquitto runs as. Started as root it would switch to `mosquitto` unless told otherwise; the default is
# the user that renders the files (so the broker can read them and write its pid/persistence), see docs/broker.md.
MQTT_BROKER_RUN_AS = env.str("MQTT_BROKER_RUN_AS", default="")
MQTT_BROKER_BINARY = env.str("MQTT_BROKER_BINARY", default="mosquitto")
# PBKDF2-SHA512 iterations of broker password lines. 1 is deliberate for 256-bit random secrets: the broker pays the
# cost on every connect and every re-authentication at reload (docs/broker.md has the measurements and the reasoning).
MQTT_PASSWORD_ITERATIONS = env.int("MQTT_PASSWORD_ITERATIONS", default=1)
MQTT_OPERATOR_SECRET_MIN_LENGTH = env.int("MQTT_OPERATOR_SECRET_MIN_LENGTH", default=32)
MQTT_MAX_KEEPALIVE = env.int("MQTT_MAX_KEEPALIVE", default=300)
MQTT_MAX_CONNECTIONS = env.int("MQTT_MAX_CONNECTIONS", default=-1)
# Per-client queue. Mosquitto also drops QoS 0 messages to a slow online subscriber past this limit, so it must be
# far above the consumer's burst (about 1-2 s of telemetry at full rate), not the default 1000.
MQTT_MAX_QUEUED_MESSAGES = env.int("MQTT_MAX_QUEUED_MESSAGES", default=100_000)
MQTT_MAX_QUEUED_BYTES = env.int("MQTT_MAX_QUEUED_BYTES", default=256 * 1024 * 1024)
MQTT_MAX_INFLIGHT_MESSAGES = env.int("MQTT_MAX_INFLIGHT_MESSAGES", default=100)
# Enforcement changes within this window become one render and one reload.
MQTT_APPLY_COALESCE_MS = env.int("MQTT_APPLY_COALESCE_MS", default=50)
MQTT_APPLY_MAX_RETRIES = env.int("MQTT_APPLY_MAX_RETRIES", default=8)
MQTT_PROBE_TIMEOUT = env.float("MQTT_PROBE_TIMEOUT", default=3.0)
MQTT_RECONCILE_SECONDS = env.int("MQTT_RECONCILE_SECONDS", default=60)
# The console's own broker identities: named outside the device prefix; secrets from the environment in production.
MQTT_CONSUMER_USERNAME = env.str("MQTT_CONSUMER_USERNAME", default="fleetkeeper-consumer")
MQTT_MONITOR_USERNAME = env.str("MQTT_MONITOR_USERNAME", default="fleetkeeper-monitor")
MQTT_PROBE_USERNAME = env.str("MQTT_PROBE_USERNAME", default="fleetkeeper-probe")
MQTT_CONSUMER_PASSWORD = env.str("MQTT_CONSUMER_PASSWORD", default="") or dev_secret("MQTT_CONSUMER_PASSWORD")
MQTT_MONITOR_PASSWORD = env.str("MQTT_MONITOR_PASSWORD", default="") or dev_secret("MQTT_MONITOR_PASSWORD")
MQTT_PROBE_PASSWORD = env.str("MQTT_PROBE_PASSWORD", default="") or dev_secret("MQTT_PROBE_PASSWORD")
MQTT_SHARED_SUBSCRIPTION_GROUP = env.str("MQTT_SHARED_SUBSCRIPTION_GROUP", default="fleetkeeper")
# use_username_as_clientid binds a username to one session: each consumer replica has its own username
# (fleetkeeper-consumer, fleetkeeper-consumer-2, ...) sharing MQTT_CONSUMER_PASSWORD.
MQTT_CONSUMER_REPLICAS = env.int("MQTT_CONSUMER_REPLICAS", default=1)

# --- PKI (issue 8): the fleet CAs, device certificates, the broker's TLS listener (docs/pki.md)
# Encrypts every CA and broker private key at rest (PKCS#8, PBES2/AES-256). Losing it means re-creating the CAs.
FLEET_PKI_KEY = env.str("FLEET_PKI_KEY", default="") or dev_secret("FLEET_PKI_KEY")
PKI_ORGANISATION = env.str("PKI_ORGANISATION", default="Fleetkeeper")
PKI_ROOT_DAYS = env.int("PKI_ROOT_DAYS", default=3650)
PKI_ISSUING_DAYS = env.int("PKI_ISSUING_DAYS", default=1825)
PKI_SERVER_CERT_DAYS = env.int("PKI_SERVER_CERT_DAYS", default=365)
PKI_DEVICE_CERT_DAYS = env.int("PKI_DEVICE_CERT_DAYS", default=90)
PKI_DEVICE_CERT_MAX_DAYS = env.int("PKI_DEVICE_CERT_MAX_DAYS", default=397)
# The CRL's nextUpdate; it is re-signed when less than half of this is left (a stale CRL refuses every client).
PKI_CRL_DAYS = env.int("PKI_CRL_DAYS", default=7)
# Extra names for the broker's server certificate (MQTT_HOST, MQTT_PUBLIC_HOST, localhost, 127.0.0.1 are always in).
PKI_BROKER_HOSTS = env.list("PKI_BROKER_HOSTS", default=[])
# The TLS listener (client certificates, MQTT_TLS_PORT). Off only where no PKI is wanted at all.
MQTT_TLS_LISTENER = env.bool("MQTT_TLS_LISTENER", default=True)
# The plain (password) listener. Off: it is bound to 127.0.0.1 for the console's own identities only and device
# passwords are not rendered, so devices must use certificates (the posture audit flags it when on).
MQTT_PLAIN_LISTENER = env.bool("MQTT_PLAIN_LISTENER", default=True)
# security/pki/tasks.py is not an app's tasks module: the worker imports it by name.
CELERY_IMPORTS = ["security.pki.tasks"]

# --- Posture audit (docs/posture.md): probes the console's broker the way an attacker would
# The whole audit stops after this many seconds (checks left are reported "unknown"); each wait inside a check is
# bounded by the check timeout (a check as a whole by three times it).
POSTURE_TIMEOUT_SECONDS = env.float("POSTURE_TIMEOUT_SECONDS", default=20.0)
POSTURE_CHECK_TIMEOUT_SECONDS = env.float("POSTURE_CHECK_TIMEOUT_SECONDS", default=3.0)
# The message the oversize check publishes: far above MQTT_MAX_PACKET_SIZE, far below what would hurt the broker.
POSTURE_OVERSIZE_BYTES = env.int("POSTURE_OVERSIZE_BYTES", default=1024 * 1024)
# The broker's TLS certificate fails the expiry check when it has fewer days left than this.
POSTURE_CERT_WARNING_DAYS = env.int("POSTURE_CERT_WARNING_DAYS", default=30)
# The schedule created at install (django-celery-beat, editable afterwards): every N hours.
POSTURE_SCHEDULE_HOURS = env.int("POSTURE_SCHEDULE_HOURS", default=24)

# --- Detection: the telemetry consumer, the broker-log monitor, detector thresholds, alert notifications
# The consumer runs inside a Celery worker (`celery -A fleet worker --mqtt-consumer`, or this setting) or alone
# (`manage.py consume`). Replica N (1-based) logs in as the Nth consumer identity; replica 1 also runs the monitor.
DETECTION_CONSUMER_ENABLED = env.bool("DETECTION_CONSUMER_ENABLED", default=False)
DETECTION_CONSUMER_REPLICA = env.int("DETECTION_CONSUMER_REPLICA", default=1)
DETECTION_MONITOR_ENABLED = env.bool("DETECTION_MONITOR_ENABLED", default=True)
DETECTION_RECONNECT_MAX_SECONDS = env.int("DETECTION_RECONNECT_MAX_SECONDS", default=10)
# The telemetry connection's MQTT client: "lean" (security/detection/wire.py: many frames per socket read, about
# twice paho's rate, docs/benchmarks.md) or "paho" (paho-mqtt's per-message callback).
DETECTION_MQTT_CLIENT = env.str("DETECTION_MQTT_CLIENT", default="lean")
# Denied publishes (cross-device publishes, forged commands) are logged by Mosquitto only at debug level, never on
# the log topic. On: the broker writes its whole log, debug included, to <MQTT_BROKER_DIR>/broker-debug.log instead
# of stdout and the monitor tails it (broker and console must share that directory, as the files adapter already
# requires). Off by default: debug logging writes two lines per delivered message (docs/benchmarks.md, "Ingest").
DETECTION_DENIED_PUBLISHES = env.bool("DETECTION_DENIED_PUBLISHES", default=False)
# The monitor truncates the debug log once it has read this much of it.
DETECTION_DEBUG_LOG_MAX_BYTES = env.int("DETECTION_DEBUG_LOG_MAX_BYTES", default=64 * 1024 * 1024)
# Messages per batch while busy (folded into per-device aggregates as they arrive).
DETECTION_BATCH_MAX = env.int("DETECTION_BATCH_MAX", default=2_000)
DETECTION_FLUSH_SECONDS = env.float("DETECTION_FLUSH_SECONDS", default=0.1)
DETECTION_REDIS_PREFIX = env.str("DETECTION_REDIS_PREFIX", default="fk:det")
# The database is written at most this often (newest totals per device), whatever the message rate.
DETECTION_DB_FLUSH_SECONDS = env.float("DETECTION_DB_FLUSH_SECONDS", default=1.0)
# Learned value ranges are re-read from Redis (shared by the replicas) after this long.
DETECTION_STATE_CACHE_SECONDS = env.float("DETECTION_STATE_CACHE_SECONDS", default=5.0)
# Rolling windows for rates and sizes.
DETECTION_WINDOW_SECONDS = env.int("DETECTION_WINDOW_SECONDS", default=10)
# Windows a device needs before its own baseline is trusted; until then only the absolute ceilings apply.
DETECTION_BASELINE_MIN_WINDOWS = env.int("DETECTION_BASELINE_MIN_WINDOWS", default=6)
DETECTION_BASELINE_ALPHA = env.float("DETECTION_BASELINE_ALPHA", default=0.2)
DETECTION_RATE_FACTOR = env.float("DETECTION_RATE_FACTOR", default=5.0)
DETECTION_RATE_MIN_EXCESS = env.int("DETECTION_RATE_MIN_EXCESS", default=50)
DETECTION_RATE_ABSOLUTE_PER_WINDOW = env.int("DETECTION_RATE_ABSOLUTE_PER_WINDOW", default=150)
DETECTION_SIZE_FACTOR = env.float("DETECTION_SIZE_FACTOR", default=4.0)
DETECTION_SIZE_MIN_BYTES = env.int("DETECTION_SIZE_MIN_BYTES", default=2048)
# Telemetry values: learned per device and reading; out of range = beyond the learned span by this margin.
DETECTION_VALUE_MIN_SAMPLES = env.int("DETECTION_VALUE_MIN_SAMPLES", default=30)
DETECTION_VALUE_MARGIN = env.float("DETECTION_VALUE_MARGIN", default=0.5)
# Authentication failures per source address within the window: brute force; many addresses failing: spraying.
DETECTION_AUTH_WINDOW_SECONDS = env.int("DETECTION_AUTH_WINDOW_SECONDS", default=60)
DETECTION_AUTH_FAILURES_BRUTE_FORCE = env.int("DETECTION_AUTH_FAILURES_BRUTE_FORCE", default=5)
DETECTION_AUTH_SPRAY_ADDRESSES = env.int("DETECTION_AUTH_SPRAY_ADDRESSES", default=10)
# Refusals are held this long before they count: the console's own canary probe is refused on purpose at every
# policy apply, and its refusals are dropped when the probe then logs in from the same address.
DETECTION_PROBE_HOLD_SECONDS = env.float("DETECTION_PROBE_HOLD_SECONDS", default=1.5)
# A connected device that sent nothing for this long is silent (checked by a periodic task).
DETECTION_SILENCE_SECONDS = env.int("DETECTION_SILENCE_SECONDS", default=600)
DETECTION_SILENCE_CHECK_SECONDS = env.int("DETECTION_SILENCE_CHECK_SECONDS", default=60)
# Fingerprints (protocol, clean flag, keepalive, source network) remembered per device for the clone check.
DETECTION_FINGERPRINT_HISTORY = env.int("DETECTION_FINGERPRINT_HISTORY", default=8)
# Notifications: an alert at or above the threshold is sent (empty recipients / URL = that channel is off).
DETECTION_EMAIL_RECIPIENTS = env.list("DETECTION_EMAIL_RECIPIENTS", default=[])
DETECTION_EMAIL_MIN_SEVERITY = env.str("DETECTION_EMAIL_MIN_SEVERITY", default="high")
DETECTION_WEBHOOK_URL = env.str("DETECTION_WEBHOOK_URL", default="")
# The webhook's HMAC-SHA256 key (header X-Fleetkeeper-Signature); required in production only when a URL is set.
DETECTION_WEBHOOK_SECRET = env.str("DETECTION_WEBHOOK_SECRET", default="") or (
    "" if PRODUCTION and not DETECTION_WEBHOOK_URL else dev_secret("DETECTION_WEBHOOK_SECRET")
)
DETECTION_WEBHOOK_MIN_SEVERITY = env.str("DETECTION_WEBHOOK_MIN_SEVERITY", default="medium")
DETECTION_WEBHOOK_TIMEOUT = env.float("DETECTION_WEBHOOK_TIMEOUT", default=5.0)
DETECTION_NOTIFY_MAX_RETRIES = env.int("DETECTION_NOTIFY_MAX_RETRIES", default=5)
# Automatic response: alert kinds that quarantine their device when raised at critical severity. Off by default.
DETECTION_AUTO_QUARANTINE_KINDS = env.list("DETECTION_AUTO_QUARANTINE_KINDS", default=[])

# --- Credential rotation (issue 7, docs/rotation.md)
# The console's identity for commands to devices (rx/+/<channel>, write only). use_username_as_clientid makes one
# username one session, so only one worker publishes at a time (a Redis lock around a short-lived connection).
MQTT_COMMANDER_USERNAME = env.str("MQTT_COMMANDER_USERNAME", default="fleetkeeper-commander")
MQTT_COMMANDER_PASSWORD = env.str("MQTT_COMMANDER_PASSWORD", default="") or dev_secret("MQTT_COMMANDER_PASSWORD")
# Seconds to wait for the broker's PUBACKs of one chunk of commands (and for the publishing lock).
ROTATION_PUBLISH_TIMEOUT = env.float("ROTATION_PUBLISH_TIMEOUT", default=15.0)
# Rotations delivered per task (one connection, one lock, one database write per chunk).
ROTATION_DELIVER_CHUNK = env.int("ROTATION_DELIVER_CHUNK", default=1000)
# A delivered rotation the device has not confirmed is sent again (fresh secret) after this long, once the device
# has been seen since the last delivery (it came back online, or the message was lost).
ROTATION_RESEND_SECONDS = env.int("ROTATION_RESEND_SECONDS", default=120)
# Pending or confirmed rotations untouched this long are re-enqueued (a worker died mid-batch).
ROTATION_STALLED_SECONDS = env.int("ROTATION_STALLED_SECONDS", default=60)
# After the switch the device must reconnect with its new secret within this long, or an alert is raised.
ROTATION_PROOF_TIMEOUT_SECONDS = env.int("ROTATION_PROOF_TIMEOUT_SECONDS", default=600)
# A device reporting a connect with its previous secret this long after its switch was applied raises
# rotation_fallback (before that, the reload and its reconnect may still be in flight).
ROTATION_FALLBACK_MARGIN_SECONDS = env.int("ROTATION_FALLBACK_MARGIN_SECONDS", default=5)
# How often the rotation tick runs (re-sends, resumes, completions, deadlines); a django-celery-beat entry.
ROTATION_TICK_SECONDS = env.int("ROTATION_TICK_SECONDS", default=30)
# The credentials message's `expires`: a device that receives it later refuses it (a fresh one is re-sent).
ROTATION_MESSAGE_TTL_SECONDS = env.int("ROTATION_MESSAGE_TTL_SECONDS", default=3600)

# --- Rotation campaigns and certificate rotation (issue 7, docs/rotation.md "Campaigns", "Certificates")
# How often a running campaign checks its current wave (seconds; the task re-enqueues itself this often).
ROTATION_CAMPAIGN_POLL_SECONDS = env.float("ROTATION_CAMPAIGN_POLL_SECONDS", default=2.0)
# A device counts as online for a wave's baseline when it was seen this recently (seconds).
ROTATION_CAMPAIGN_ONLINE_SECONDS = env.int("ROTATION_CAMPAIGN_ONLINE_SECONDS", default=900)
# A running campaign whose row has not moved for this long is picked up again (its task was lost with a worker).
ROTATION_CAMPAIGN_STALLED_SECONDS = env.int("ROTATION_CAMPAIGN_STALLED_SECONDS", default=60)
# After a device confirms its new certificate, its old one stays valid this long, then it is revoked (CRL).
ROTATION_CERTIFICATE_GRACE_SECONDS = env.int("ROTATION_CERTIFICATE_GRACE_SECONDS", default=86400)
# The key the device is asked to make for its new certificate: ec-p256 or ed25519.
ROTATION_CERTIFICATE_KEY_TYPE = env.str("ROTATION_CERTIFICATE_KEY_TYPE", default="ec-p256")

# --- REST API
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["security.permissions.RolePermission"],
    "DEFAULT_PAGINATION_CLASS": "fleet.api.Pagination",
    "PAGE_SIZE": FLEET_PAGE_SIZE,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "fleet.schema.AutoSchema",
    "EXCEPTION_HANDLER": "fleet.api.exception_handler",
    "DEFAULT_THROTTLE_RATES": {"token": env.str("API_TOKEN_THROTTLE", default="20/min")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Fleetkeeper API",
    "DESCRIPTION": "Device inventory and security enforcement for an MQTT fleet.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Credential rotation (issue 7): its kind and state enums by name (other APIs have fields called kind and state).
    "ENUM_NAME_OVERRIDES": {
        "RotationKindEnum": "security.models.CredentialRotation.Kind",
        "RotationStateEnum": "security.models.CredentialRotation.State",
        "CampaignStateEnum": "security.models.RotationCampaign.State",
        "CampaignKindEnum": "security.rotation.campaigns.KINDS",
        # Posture audit (docs/posture.md).
        "PostureStateEnum": "security.models.PostureReport.State",
        "PostureTriggerEnum": "security.models.PostureReport.Trigger",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- Revocation: session evidence and purge (issue 5, docs/revocation.md)
# The identity that reads the broker's connection log ($SYS/broker/log/N, read only) around a revocation's reload,
# to record that the device's live session was dropped. Its username is fixed ("N", security/brokers/render.py says
# why). Its password is derived from MQTT_PROBE_PASSWORD by default (production needs no extra secret).
MQTT_SESSIONS_PASSWORD = (
    env.str("MQTT_SESSIONS_PASSWORD", default="")
    or __import__("hmac").new(MQTT_PROBE_PASSWORD.encode(), b"fleetkeeper-sessions", "sha256").hexdigest()
)
# Which broker enforces: "mosquitto" (one node; the rendered files, SIGHUP), "rabbitmq" (a cluster asking the
# console through the HTTP auth hook) or "emqx" (the same hook in EMQX's dialect; contract-tested only, never run
# against a real EMQX here). docs/broker.md, "Choosing a broker".
BROKER_BACKEND = env.str("BROKER_BACKEND", default="mosquitto")
if BROKER_BACKEND not in ("mosquitto", "rabbitmq", "emqx"):
    raise ImproperlyConfigured(f"BROKER_BACKEND must be mosquitto, rabbitmq or emqx, not {BROKER_BACKEND!r}")
# --- clustered brokers through the HTTP auth hook (docs/broker.md, "Choosing a broker") ---------------------------
# The broker asks the console at every connect, publish and subscribe; the console answers from the enforcement
# core. The hook's URLs carry BROKER_HOOK_SECRET: only the brokers know it (and the hook is never published).
# In production it must be set for the hook to answer at all: without it every request is refused.
BROKER_HOOK_SECRET = env.str("BROKER_HOOK_SECRET", default="") or (
    "" if PRODUCTION else dev_secret("BROKER_HOOK_SECRET")
)
# RabbitMQ: the management API of every node (any node can drop a session anywhere in the cluster), a management
# user with the administrator tag and no vhost permission (it cannot connect over MQTT), and the MQTT vhost.
RABBITMQ_MANAGEMENT_URLS = env.list("RABBITMQ_MANAGEMENT_URLS", default=["http://127.0.0.1:15672"])
RABBITMQ_MANAGEMENT_USER = env.str("RABBITMQ_MANAGEMENT_USER", default="fleetkeeper")
RABBITMQ_MANAGEMENT_PASSWORD = env.str("RABBITMQ_MANAGEMENT_PASSWORD", default="") or (
    "" if PRODUCTION else dev_secret("RABBITMQ_MANAGEMENT_PASSWORD")
)
RABBITMQ_VHOST = env.str("RABBITMQ_VHOST", default="/")
RABBITMQ_MANAGEMENT_TIMEOUT = env.float("RABBITMQ_MANAGEMENT_TIMEOUT", default=3.0)
# EMQX 5: the REST API of every node (an API key with the right to kick and ban). Its MQTT listener, like any
# broker's, is MQTT_HOST:MQTT_PORT.
EMQX_API_URLS = env.list("EMQX_API_URLS", default=["http://127.0.0.1:18083"])
EMQX_API_KEY = env.str("EMQX_API_KEY", default="fleetkeeper")
EMQX_API_SECRET = env.str("EMQX_API_SECRET", default="") or ("" if PRODUCTION else dev_secret("EMQX_API_SECRET"))
EMQX_API_TIMEOUT = env.float("EMQX_API_TIMEOUT", default=3.0)
# The hook's own listener (manage.py run_hook; gunicorn fleet.hook_wsgi in production): brokers only, never the
# console's public port.
BROKER_HOOK_HOST = env.str("BROKER_HOOK_HOST", default="127.0.0.1")
BROKER_HOOK_PORT = env.int("BROKER_HOOK_PORT", default=8010)
# Requests per second one hook process answers before it answers deny ("rate_limited", counted as an event), and
# failed logins per username per BROKER_HOOK_LOGIN_WINDOW seconds before further attempts are refused unchecked.
BROKER_HOOK_RATE = env.float("BROKER_HOOK_RATE", default=3000.0)
BROKER_HOOK_BURST = env.int("BROKER_HOOK_BURST", default=3000)
BROKER_HOOK_LOGIN_FAILURES = env.int("BROKER_HOOK_LOGIN_FAILURES", default=10)
BROKER_HOOK_LOGIN_WINDOW = env.int("BROKER_HOOK_LOGIN_WINDOW", default=60)
# The decision cache (security/enforcement/cache.py): a Redis without persistence; the outbox invalidates it.
ENFORCEMENT_CACHE_URL = env.str("ENFORCEMENT_CACHE_URL", default=REDIS_URL)
ENFORCEMENT_CACHE_PREFIX = env.str("ENFORCEMENT_CACHE_PREFIX", default="fk:enf")
ENFORCEMENT_CACHE_TIMEOUT = env.float("ENFORCEMENT_CACHE_TIMEOUT", default=0.25)
ENFORCEMENT_CACHE_MAX_AGE = env.int("ENFORCEMENT_CACHE_MAX_AGE", default=3600)  # bounds memory; never invalidates
# The hook's denials, for detection (a Redis stream, capped): every refused login, publish and subscribe.
BROKER_HOOK_EVENTS_MAXLEN = env.int("BROKER_HOOK_EVENTS_MAXLEN", default=100_000)

# After a revocation is verified: discard the device's persistent session (queued messages) on the broker and clear
# the retained messages on its own channels. On by default; off keeps them (they are unreachable by the device).
REVOCATION_PURGE_SESSIONS = env.bool("REVOCATION_PURGE_SESSIONS", default=True)
# The purge costs two reloads: it waits until no revocation or quarantine arrived for this long, so it never delays
# one, but never longer than REVOCATION_PURGE_MAX_DELAY_SECONDS after the verification.
REVOCATION_PURGE_QUIET_SECONDS = env.int("REVOCATION_PURGE_QUIET_SECONDS", default=10)
REVOCATION_PURGE_MAX_DELAY_SECONDS = env.int("REVOCATION_PURGE_MAX_DELAY_SECONDS", default=300)

# --- Firmware registry (docs/firmware.md) ---------------------------------------------------------------------------
# Uploaded images are stored here, named by their SHA-256, and served to devices at FIRMWARE_DOWNLOAD_BASE_URL.
FIRMWARE_STORAGE_DIR = Path(env.str("FIRMWARE_STORAGE_DIR", default=str(VAR_DIR / "firmware")))
# The console's address as devices see it: offers of uploaded images carry <base>/firmware/images/<sha256>.bin.
# Required in production for uploaded images (offers of images hosted elsewhere carry their own URL).
FIRMWARE_DOWNLOAD_BASE_URL = env.str(
    "FIRMWARE_DOWNLOAD_BASE_URL", default="" if PRODUCTION else "http://127.0.0.1:8000"
).rstrip("/")
FIRMWARE_MAX_IMAGE_BYTES = env.int("FIRMWARE_MAX_IMAGE_BYTES", default=256 * 1024 * 1024)
# A device that receives an offer later than this answers "expired" and does nothing (offer it again).
FIRMWARE_OFFER_TTL_SECONDS = env.int("FIRMWARE_OFFER_TTL_SECONDS", default=86400)
# Offers to more devices than this at once need the typed device count in the UI.
FIRMWARE_OFFER_CONFIRM_ABOVE = env.int("FIRMWARE_OFFER_CONFIRM_ABOVE", default=10)

# --- Payload encryption (docs/device-protocol.md "Payload encryption", docs/detection.md) --------------------------
# Encrypts every device payload key at rest (AES-256-GCM under a key derived from it with HKDF-SHA256). Losing it
# means issuing every device a new payload key.
PAYLOAD_KEYS_SECRET = env.str("PAYLOAD_KEYS_SECRET", default="") or dev_secret("PAYLOAD_KEYS_SECRET")
# Fleet default for devices that have a payload key: their clear-text messages are dropped and raise
# payload_unencrypted. A device's own setting (device page, API) overrides it.
PAYLOAD_ENCRYPTION_REQUIRED = env.bool("PAYLOAD_ENCRYPTION_REQUIRED", default=False)
# The consumer re-reads the payload keys changed since its last read this often (seconds), and before judging a batch
# in which a sealed message names a key it does not have (a key issued since).
PAYLOAD_KEYS_REFRESH_SECONDS = env.float("PAYLOAD_KEYS_REFRESH_SECONDS", default=10.0)
# Replay state (highest counter and window per device and key) is kept in Redis this long after the device's last
# sealed message; a device silent for longer starts a fresh window.
PAYLOAD_REPLAY_STATE_DAYS = env.int("PAYLOAD_REPLAY_STATE_DAYS", default=90)
