"""Pure functions: the desired broker policy and the three files Mosquitto loads (config, password file, ACL).

Nothing here touches the database, the disk or a process, so the rules can be unit-tested and the same
rendering serves the adapter, the policy page and the benchmark. See docs/broker.md for why each line is there
(and mosquitto-notes.md for the measured broker behaviour behind it).
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from security import topics
from security.enforcement.policy import ENFORCED_STATUSES, QUARANTINED
from security.enforcement.secrets import PASSWORD_HASH_RE, SALT_BYTES, SecretHashError, hash_secret, parse_hash

# Mosquitto 2.x password line: username:<the stored hash> (security/enforcement/secrets.py has its form).
# A username that may appear in the password file: no separator, no wildcard, no '$', no whitespace.
USERNAME_RE = re.compile(r"^[^:#+/$\s\x00]{1,128}$")


CONSUMER, MONITOR, PROBE = "consumer", "monitor", "probe"
COMMANDER = "commander"  # sends commands to devices (credential rotation, docs/rotation.md)
SESSIONS = "sessions"  # reads the connection log around a revocation (docs/revocation.md)
# The sessions identity's username is the log level it reads. Mosquitto 2.0.11 delivers the log lines it writes
# *during* a reload ("Client X disconnected.") only to subscribers whose grant comes from a `pattern`: `user` blocks
# are re-linked client by client during the reload, so a subscriber linked after the dropped client misses its line
# (measured, tests/security/test_revocation_sessions.py). Its grant is therefore `pattern read $SYS/broker/log/%u`,
# which matches only a client whose username is "N"; no device may be named like a log level (render skips them).
SESSIONS_USERNAME = "N"
SESSIONS_PATTERN = "pattern read $SYS/broker/log/%u"
LOG_LEVEL_NAMES = frozenset({"E", "W", "N", "I", "D", "M"})


class PolicyError(ValueError):
    """Rendered content failed validation: it must never reach the broker."""


# --- hashes ---------------------------------------------------------------------------------------------


def _stable_salt(username: str, secret: str) -> bytes:
    """Console identities are rendered from their secret on every run: a salt derived from both keeps the
    rendered line (and so the policy digest) stable; the secrets are random, so nothing is precomputable."""
    return hmac.new(secret.encode(), b"fleetkeeper-broker-salt:" + username.encode(), hashlib.sha256).digest()[
        :SALT_BYTES
    ]


# --- the desired policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleIdentity:
    """One of the console's own broker accounts (never a device)."""

    username: str
    role: str  # CONSUMER, MONITOR, PROBE or COMMANDER
    secret: str


@dataclass(frozen=True)
class TlsMaterial:
    """What the TLS listener loads (issue 8, docs/pki.md): the issuing chain devices are verified against, the
    broker's server certificate and key, the issuing CA's CRL, and the device usernames cut off in the ACL (a CRL
    refuses new handshakes only: a session already open stays connected, the ACL deny stops its traffic)."""

    ca_chain: str
    server_cert: str
    server_key: str = field(repr=False)
    crl: str
    denied: tuple[str, ...] = ()
    # Quarantined devices that hold a certificate: the quarantine ACL block applies to them with or without a password.
    quarantined: tuple[str, ...] = ()

    def files(self) -> dict[str, str]:
        return {
            TLS_CA_FILE: self.ca_chain,
            TLS_CERT_FILE: self.server_cert,
            TLS_KEY_FILE: self.server_key,
            TLS_CRL_FILE: self.crl,
        }

    def content_digest(self) -> str:
        """Goes into the rendered config, so a new CRL (or chain, or server certificate) changes the config, the
        policy digest and the probe's generation: the canary then proves the broker reloaded it."""
        return hashlib.sha256(
            "\0".join([self.ca_chain, self.server_cert, self.server_key, self.crl]).encode()
        ).hexdigest()


TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE, TLS_CRL_FILE = "ca-chain.pem", "server.crt", "server.key", "crl.pem"


@dataclass(frozen=True)
class BrokerConfig:
    """Everything from settings that shapes the rendered files (so rendering stays a pure function)."""

    broker_dir: str
    host: str
    port: int
    tls_port: int
    rx_prefix: str
    tx_prefix: str
    max_packet_size: int
    max_keepalive: int
    max_connections: int
    max_queued_messages: int
    max_queued_bytes: int
    max_inflight_messages: int
    iterations: int
    run_as: str = ""
    shared_group: str = "fleetkeeper"
    # The TLS listener (None: not rendered) and whether devices may use the plain password listener.
    tls: TlsMaterial | None = None
    plain_listener: bool = True
    # DETECTION_DENIED_PUBLISHES: the debug log file the monitor tails for denied publishes ("" = off).
    debug_log: str = ""

    @property
    def password_file(self) -> str:
        return f"{self.broker_dir}/passwd"

    @property
    def acl_file(self) -> str:
        return f"{self.broker_dir}/acl"

    @property
    def config_file(self) -> str:
        return f"{self.broker_dir}/mosquitto.conf"

    @property
    def pid_file(self) -> str:
        return f"{self.broker_dir}/mosquitto.pid"


class DeviceRow(NamedTuple):
    """One device as the policy needs it (a tuple: 100,000 of them are built per render)."""

    client_id: str
    status: str
    password_hash: str  # "" when the device has no credential


@dataclass(frozen=True)
class RenderedPolicy:
    config: str
    passwd: str
    acl: str
    # A digest of the whole policy; also the "generation" the probe's password is derived from.
    digest: str
    generation: str
    probe_password: str
    device_usernames: tuple[str, ...]
    quarantined: tuple[str, ...]
    console_usernames: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())
    tls: TlsMaterial | None = None  # written next to the other files (the config names them and their digest)

    def files(self) -> dict[str, str]:
        return {"mosquitto.conf": self.config, "passwd": self.passwd, "acl": self.acl}


def render_acl(
    *, cfg: BrokerConfig, console: Iterable[ConsoleIdentity], quarantined: Iterable[str], denied: Iterable[str] = ()
) -> str:
    rx, tx = cfg.rx_prefix, cfg.tx_prefix
    lines = [
        "# Fleetkeeper broker ACL, rendered from the database. Hand edits are undone by the reconcile job.",
        "# Deny by default: Mosquitto refuses every topic not granted below. This file is never empty (an empty",
        "# acl_file means allow-all, CVE-2018-12550), and nothing here grants $SYS or $CONTROL to a device.",
        "# No `topic` line precedes the first `user` line: anonymous clients get nothing (and are refused anyway).",
        "",
        f"# Devices: a fixed, finite set of channels (never {tx}/%u/#), %u = username = client id.",
    ]
    lines += [f"pattern write {tx}/%u/{c}" for c in topics.TX_CHANNELS]
    lines += [f"pattern read {rx}/%u/{c}" for c in topics.RX_CHANNELS]
    if any(identity.role == SESSIONS for identity in console):
        lines += [
            f"# The console's session watcher ({SESSIONS_USERNAME}) reads the notice log; %u matches only that name.",
            SESSIONS_PATTERN,
        ]
    lines += ["", "# The console's own identities. Their names lie outside the device prefix rule."]
    for identity in console:
        if identity.role == SESSIONS:
            continue  # no user block: its grant is SESSIONS_PATTERN (above)
        lines.append(f"user {identity.username}")
        if identity.role == CONSUMER:
            # Read only: commands to devices go through the commander identity (least privilege).
            lines += [f"topic read {tx}/+/{c}" for c in topics.TX_CHANNELS]
        elif identity.role == COMMANDER:
            # Write only, and only the device receive channels: it reads nothing.
            lines += [f"topic write {rx}/+/{c}" for c in topics.RX_CHANNELS]
        elif identity.role == MONITOR:
            lines.append("topic read $SYS/broker/#")
        elif identity.role == PROBE:
            # The least the canary needs beyond the device patterns: write its own command channel, so it can
            # check that an allowed topic is delivered (and that another identity's channel is not).
            lines.append(f"topic write {rx}/{identity.username}/{topics.RX_COMMAND}")
        else:
            raise PolicyError(f"unknown console identity role {identity.role!r}")
        lines.append("")
    denied = sorted(set(denied))
    quarantined = sorted(set(quarantined) - set(denied))
    if quarantined:
        lines.append("# Quarantined devices: deny exactly the channels they lose (a deny wins over the patterns);")
        lines.append(
            "# they keep the repair path: "
            + ", ".join(
                [f"{rx}/<id>/{c}" for c in topics.REPAIR_RX_CHANNELS]
                + [f"{tx}/<id>/{c}" for c in topics.REPAIR_TX_CHANNELS]
            )
        )
    for client_id in quarantined:
        lines.append(f"user {client_id}")
        lines += [f"topic deny {tx}/{client_id}/{c}" for c in topics.QUARANTINE_DENIED_TX]
        lines += [f"topic deny {rx}/{client_id}/{c}" for c in topics.QUARANTINE_DENIED_RX]
    if denied:
        lines.append("")
        lines.append(
            "# Certificate identities cut off: every certificate they hold is revoked (or the device is off the"
        )
        lines.append(
            "# broker). The CRL refuses new TLS handshakes; these denies stop a session that was already open."
        )
    for client_id in denied:
        lines.append(f"user {client_id}")
        lines += [f"topic deny {tx}/{client_id}/#", f"topic deny {rx}/{client_id}/#"]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_passwd(entries: Iterable[tuple[str, str]]) -> str:
    """``username:$7$...`` lines, in the given order."""
    return "".join(f"{username}:{stored}\n" for username, stored in entries)


def render_tls_listener(cfg: BrokerConfig) -> str:
    if cfg.tls is None:
        return f"""
# TLS listener (settings.MQTT_TLS_PORT = {cfg.tls_port}) turned off (settings.MQTT_TLS_LISTENER).
"""
    d = cfg.broker_dir
    return f"""
# TLS listener (settings.MQTT_TLS_PORT = {cfg.tls_port}): client certificates from the fleet's issuing CA, TLS 1.2+.
# The certificate's CN (= the client id) is the username and the client id, so the ACL patterns above apply to it
# and a certificate for one device cannot take over another's session. No password is checked on this listener.
# Revoked certificates are refused from the CRL at the next handshake (docs/pki.md).
# TLS material: {cfg.tls.content_digest()[:32]}
listener {cfg.tls_port} {cfg.host}
protocol mqtt
cafile {d}/{TLS_CA_FILE}
certfile {d}/{TLS_CERT_FILE}
keyfile {d}/{TLS_KEY_FILE}
crlfile {d}/{TLS_CRL_FILE}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
use_username_as_clientid true
max_connections {cfg.max_connections}
"""


def _render_log_dest(cfg: BrokerConfig) -> str:
    if not cfg.debug_log:
        return "log_dest stdout"
    # log_type applies to every destination, and debug lines never reach the log topic: the file gets the whole log,
    # debug included, and replaces stdout (which would carry two debug lines per message too).
    return f"""# DETECTION_DENIED_PUBLISHES: "Denied PUBLISH from <id>" is a debug line; the monitor tails this file.
log_dest file {cfg.debug_log}
log_type debug"""


def render_config(cfg: BrokerConfig) -> str:
    run_as = f"user {cfg.run_as}\n" if cfg.run_as else ""
    if cfg.plain_listener:
        plain = f"""# Plain MQTT listener (settings.MQTT_HOST:MQTT_PORT): password devices and the console's identities.
listener {cfg.port} {cfg.host}"""
    else:
        plain = f"""# Plain MQTT listener, loopback only: the console's own identities. Devices use the TLS listener
# (settings.MQTT_PLAIN_LISTENER is off, so no device password is rendered).
listener {cfg.port} 127.0.0.1"""
    return f"""# Fleetkeeper broker configuration, rendered by the console (manage.py render_broker_config).
# Do not edit: the reconcile job rewrites it. docs/broker.md explains every choice.

per_listener_settings false
allow_anonymous false
# Zero-length client ids would get a broker-made id; every session must name itself.
allow_zero_length_clientid false
password_file {cfg.password_file}
acl_file {cfg.acl_file}
{run_as}# Mosquitto writes this only when daemonised; run_broker and the test helper write it for the foreground broker.
pid_file {cfg.pid_file}

# Persistence keeps QoS 1 commands and retained messages for devices across a broker restart.
persistence true
persistence_location {cfg.broker_dir}/data/
autosave_interval 60

# Limits. An oversize packet disconnects its sender (max_packet_size; message_size_limit would drop it silently).
max_packet_size {cfg.max_packet_size}
# v5 clients asking for more are told to use this keepalive; a dead session is noticed within 1.5x of it.
max_keepalive {cfg.max_keepalive}
max_inflight_messages {cfg.max_inflight_messages}
# Per-client queue. Mosquitto drops even QoS 0 messages to an online subscriber that falls this far behind,
# so it is set far above the telemetry consumer's worst burst (1000, the default, loses telemetry under load).
max_queued_messages {cfg.max_queued_messages}
max_queued_bytes {cfg.max_queued_bytes}
set_tcp_nodelay true

# The broker-log monitor (fleetkeeper-monitor) reads connections, refusals and subscriptions from $SYS/broker/log/#.
log_dest topic
{_render_log_dest(cfg)}
log_type error
log_type warning
log_type notice
log_type information
log_type subscribe
log_type unsubscribe
connection_messages true
log_timestamp true
sys_interval 10

{plain}
protocol mqtt
# The username becomes the client id: a credential is bound to its id, and no device can take over another's session.
use_username_as_clientid true
max_connections {cfg.max_connections}
{render_tls_listener(cfg)}"""


def policy_render(*, cfg: BrokerConfig, devices: Iterable[DeviceRow], console: list[ConsoleIdentity]) -> RenderedPolicy:
    """The whole desired policy from the device rows and the console identities.

    The probe's password is derived from the digest of everything else: when the probe can log in with it, the
    broker has loaded exactly this generation of the files (a SIGHUP is asynchronous; this is how we know)."""
    console_names = {c.username for c in console}
    device_entries: list[tuple[str, str]] = []
    quarantined: list[str] = []
    skipped: list[str] = []
    for row in devices:
        if row.status not in ENFORCED_STATUSES or not row.password_hash or not cfg.plain_listener:
            continue
        if row.client_id in console_names or row.client_id in LOG_LEVEL_NAMES or not USERNAME_RE.match(row.client_id):
            skipped.append(row.client_id)
            continue
        device_entries.append((row.client_id, row.password_hash))
        if row.status == QUARANTINED:
            quarantined.append(row.client_id)
    device_entries.sort()
    probe = next((c for c in console if c.role == PROBE), None)
    others = [c for c in console if c.role != PROBE]
    console_entries = [
        (c.username, hash_secret(c.secret, iterations=cfg.iterations, salt=_stable_salt(c.username, c.secret)))
        for c in others
    ]
    config = render_config(cfg)
    if cfg.tls is not None:
        # Quarantine applies to certificate identities too (the same username), whether or not they have a password.
        quarantined = sorted(set(quarantined) | set(cfg.tls.quarantined))
    acl = render_acl(
        cfg=cfg, console=console, quarantined=quarantined, denied=cfg.tls.denied if cfg.tls is not None else ()
    )
    base_passwd = render_passwd(console_entries + device_entries)
    generation = hashlib.sha256("\0".join([config, acl, base_passwd]).encode()).hexdigest()[:24]
    probe_password = ""
    passwd = base_passwd
    if probe is not None:
        probe_password = probe_generation_password(probe.secret, generation)
        probe_line = hash_secret(
            probe_password, iterations=cfg.iterations, salt=_stable_salt(probe.username, probe_password)
        )
        # Last: the digest of the files then extends the generation's hash by one line, so the revocation fast path
        # hashes 100,000 lines once instead of twice (security/brokers/files.py, derive_policy).
        passwd = base_passwd + render_passwd([(probe.username, probe_line)])
    digest = files_digest(config=config, passwd=passwd, acl=acl)
    return RenderedPolicy(
        config=config,
        passwd=passwd,
        acl=acl,
        digest=digest,
        generation=generation,
        probe_password=probe_password,
        device_usernames=tuple(u for u, _ in device_entries),
        quarantined=tuple(sorted(quarantined)),
        console_usernames=tuple(sorted(console_names)),
        skipped=tuple(skipped),
        tls=cfg.tls,
    )


def probe_generation_password(probe_secret: str, generation: str) -> str:
    return hmac.new(probe_secret.encode(), f"generation:{generation}".encode(), hashlib.sha256).hexdigest()


def files_digest(*, config: str, passwd: str, acl: str) -> str:
    return hashlib.sha256("\0".join([config, acl, passwd]).encode()).hexdigest()


# --- validation and comparison ---------------------------------------------------------------------------


# A whole password line with exact sizes: base64 of 12 bytes is 16 characters, of 64 bytes 86 plus "==".
_PASSWD_LINE_RE = re.compile(r"([^:#+/$\s\x00]{1,128}):(\$7\$[1-9][0-9]{0,8}\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==)")


def parse_passwd(text: str) -> dict[str, str]:
    """username -> stored hash, refusing anything Mosquitto would misread (checked line by line with one exact
    pattern: fast enough for 100,000 lines on every write)."""
    users: dict[str, str] = {}
    fullmatch = _PASSWD_LINE_RE.fullmatch
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        match = fullmatch(line)
        if match is None:
            username = line.partition(":")[0]
            if not USERNAME_RE.match(username):
                raise PolicyError(f"password file line {number}: bad username")
            try:
                parse_hash(line.partition(":")[2])
            except SecretHashError as exc:  # the precise reason
                raise PolicyError(f"password file line {number}: {exc}") from exc
            raise PolicyError(f"password file line {number}: not a Mosquitto $7$ line")
        username, stored = match.groups()
        if username in users:
            raise PolicyError(f"password file line {number}: duplicate username {username!r}")
        users[username] = stored
    return users


def parse_passwd_lenient(text: str) -> dict[str, str]:
    """For reading what is on disk (possibly hand-edited): every ``user:rest`` line, unvalidated."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            username, _, stored = line.partition(":")
            users[username] = stored
    return users


_ACL_LINE_RE = re.compile(
    r"^(?:user \S+|pattern (?:read|write|readwrite|deny) \S+|topic (?:read|write|readwrite|deny) \S+)$"
)


def validate_acl(text: str) -> None:
    """Deny-by-default and never empty: at least the device patterns, every line well-formed, no grant before
    the first ``user`` line (it would apply to anonymous clients), nothing on $SYS or $CONTROL for devices."""
    rules = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not any(line.startswith("pattern ") for line in rules):
        raise PolicyError("the ACL has no device patterns (an empty ACL file means allow-all)")
    seen_user = False
    for line in rules:
        if not _ACL_LINE_RE.match(line):
            raise PolicyError(f"malformed ACL line {line!r}")
        if line.startswith("user "):
            seen_user = True
        elif line.startswith("topic ") and not seen_user:
            raise PolicyError(f"ACL line {line!r} would apply to anonymous clients")
        elif line == SESSIONS_PATTERN:
            continue  # matches only the username "N", which no device may have (see SESSIONS_USERNAME)
        elif line.startswith("pattern "):
            target = line.split(" ", 2)[2]
            if target.startswith("$") or target.startswith("#") or target.startswith("+") or "%u" not in target:
                raise PolicyError(f"ACL pattern {line!r} is not confined to the device's own topics")
            if target.endswith("/#") and line.split(" ")[1] != "deny":
                raise PolicyError(f"ACL pattern {line!r} grants a whole subtree; grant channels one by one")


def validate_config(text: str, cfg: BrokerConfig) -> None:
    options = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            options.setdefault(key, value)
    required = {
        "allow_anonymous": "false",
        "per_listener_settings": "false",
        "use_username_as_clientid": "true",
        "allow_zero_length_clientid": "false",
        "password_file": cfg.password_file,
        "acl_file": cfg.acl_file,
    }
    for key, value in required.items():
        if options.get(key) != value:
            raise PolicyError(f"broker config must say `{key} {value}`")
    if "cafile" in options or "certfile" in options:
        # The TLS listener must never accept a client without a certificate, nor one the CRL refuses.
        for key in ("require_certificate", "use_identity_as_username", "crlfile", "tls_version"):
            if key not in options:
                raise PolicyError(f"the TLS listener must set `{key}`")
        if options["require_certificate"] != "true" or options["use_identity_as_username"] != "true":
            raise PolicyError(
                "the TLS listener must say `require_certificate true` and `use_identity_as_username true`"
            )
        if options["tls_version"] not in ("tlsv1.2", "tlsv1.3"):
            raise PolicyError("the TLS listener must require TLS 1.2 or newer")


def validate(policy: RenderedPolicy, cfg: BrokerConfig) -> None:
    """Everything checked before a file is renamed into place."""
    validate_config(policy.config, cfg)
    validate_acl(policy.acl)
    parse_passwd(policy.passwd)


def diff_text(name: str, current: str | None, desired: str, *, max_lines: int = 200) -> list[str]:
    if current == desired:
        return []
    lines = list(
        difflib.unified_diff(
            (current or "").splitlines(),
            desired.splitlines(),
            fromfile=f"{name} (on the broker)",
            tofile=f"{name} (desired)",
            lineterm="",
            n=1,
        )
    )
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... {len(lines) - max_lines} more lines"]
    return lines


def redact_passwd(text: str) -> str:
    """The password file as the policy page shows it: usernames and hash parameters, never the hashes."""
    out = []
    for line in text.splitlines():
        username, sep, stored = line.partition(":")
        if not sep:
            out.append("(unreadable line)")
            continue
        match = PASSWORD_HASH_RE.match(stored)
        out.append(f"{username}:$7${match['iterations']}$…" if match else f"{username}:(not a $7$ hash)")
    return "\n".join(out) + ("\n" if out else "")


def passwd_drift(current: str | None, desired: str) -> dict[str, list[str]]:
    """Which usernames differ between the file on disk and the desired one (for drift details and alerts)."""
    have = parse_passwd_lenient(current or "")
    want = parse_passwd_lenient(desired)
    return {
        "unknown": sorted(set(have) - set(want)),
        "missing": sorted(set(want) - set(have)),
        "changed": sorted(u for u in set(have) & set(want) if have[u] != want[u]),
    }
