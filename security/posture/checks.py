"""The posture audit's checks: one small function per check, each probing the broker the way an attacker would.

Every check gets the run's ``Context`` and returns a ``Finding``. A check judges by what the broker *does*
(delivers, acknowledges, disconnects), never by what it says it will do: Mosquitto 2.0.11 grants every SUBSCRIBE
under an ``acl_file`` and filters each message at delivery (mosquitto-notes.md), so a SUBACK proves nothing. A check
that cannot run, or whose positive control did not work, says ``unknown`` and why; it never says ``pass``.
docs/posture.md describes every check, what it proves and what it cannot see. No Django import here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .access_checks import (
    check_anonymous_connect,
    check_client_id_outside_prefix,
    check_default_credentials,
    check_device_publish_other,
    check_device_read_other_rx,
    check_device_read_other_tx,
    check_oversize_publish,
    check_retained_readable,
    check_sys_readable_by_devices,
    check_wildcard_hash,
    check_wildcard_plus,
    check_wildcard_sys,
)
from .context import (
    CRITICAL,
    HIGH,
    MEDIUM,
    Context,
    Finding,
)
from .tls_checks import (
    check_plain_listener,
    check_tls_certificate_expiry,
    check_tls_client_certificate,
    check_tls_old_versions,
)

# --- the catalogue ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSpec:
    id: str
    title: str
    severity: str
    fix: str
    run: Callable[[Context], Finding]


CHECKS: dict[str, CheckSpec] = {
    spec.id: spec
    for spec in (
        CheckSpec(
            "anonymous_connect",
            "Anonymous clients can connect",
            CRITICAL,
            "Set `allow_anonymous false` (the console's rendered config does); every client must authenticate.",
            check_anonymous_connect,
        ),
        CheckSpec(
            "default_credentials",
            "Well-known default credentials are accepted",
            CRITICAL,
            "Remove the default account from the password file, or give it a long random secret.",
            check_default_credentials,
        ),
        CheckSpec(
            "client_id_outside_prefix",
            "A client can connect under an id of its own choosing, outside the fleet prefix",
            MEDIUM,
            "Set `use_username_as_clientid true` so a credential is bound to one client id, and refuse anonymous "
            "clients.",
            check_client_id_outside_prefix,
        ),
        CheckSpec(
            "wildcard_hash",
            "Subscribing to '#' delivers other clients' messages",
            HIGH,
            "Use a deny-by-default ACL (acl_file with per-device patterns, never an empty file) so each message is "
            "delivered only to who may read it.",
            check_wildcard_hash,
        ),
        CheckSpec(
            "wildcard_plus",
            "Subscribing to '+/#' delivers other clients' messages",
            HIGH,
            "Use a deny-by-default ACL (acl_file with per-device patterns) so each message is delivered only to who "
            "may read it.",
            check_wildcard_plus,
        ),
        CheckSpec(
            "wildcard_sys",
            "Subscribing to '$SYS/#' delivers the broker's internals to the weakest identity",
            MEDIUM,
            "Grant $SYS only to the console's monitor identity in the ACL.",
            check_wildcard_sys,
        ),
        CheckSpec(
            "device_read_other_rx",
            "A device can read another device's receive (rx) topics",
            HIGH,
            "Grant devices only `pattern read <rx>/%u/<channel>` lines (their own channels) in the ACL.",
            check_device_read_other_rx,
        ),
        CheckSpec(
            "device_read_other_tx",
            "A device can read another device's transmit (tx) topics",
            HIGH,
            "Give devices no read grant on the tx topics; only the console's consumer reads them.",
            check_device_read_other_tx,
        ),
        CheckSpec(
            "device_publish_other",
            "A device can publish on another device's topics (forge its telemetry or commands)",
            CRITICAL,
            "Grant devices only `pattern write <tx>/%u/<channel>` lines in the ACL; commands come from the console's "
            "commander identity only.",
            check_device_publish_other,
        ),
        CheckSpec(
            "oversize_publish",
            "Oversize messages are accepted and delivered",
            MEDIUM,
            "Set `max_packet_size` (the console renders MQTT_MAX_PACKET_SIZE) so an oversize packet disconnects its "
            "sender.",
            check_oversize_publish,
        ),
        CheckSpec(
            "retained_readable",
            "Retained messages on other devices' topics are readable by everyone",
            MEDIUM,
            "Use a deny-by-default ACL: retained messages are then delivered only to who may read their topic.",
            check_retained_readable,
        ),
        CheckSpec(
            "sys_readable_by_devices",
            "Devices can read $SYS (broker statistics and, with log_dest topic, its log)",
            MEDIUM,
            "Grant $SYS only to the console's monitor identity; give devices no read grant outside their rx channels.",
            check_sys_readable_by_devices,
        ),
        CheckSpec(
            "plain_listener",
            "A plain-text MQTT listener is open while TLS is available",
            MEDIUM,
            "Once devices use certificates, turn the plain listener off for devices (MQTT_PLAIN_LISTENER=false binds "
            "it to 127.0.0.1 for the console's identities only).",
            check_plain_listener,
        ),
        CheckSpec(
            "tls_old_versions",
            "The TLS listener accepts TLS 1.0 or 1.1",
            HIGH,
            "Set `tls_version tlsv1.2` (or tlsv1.3) on the TLS listener (the console's rendered config does).",
            check_tls_old_versions,
        ),
        CheckSpec(
            "tls_certificate_expiry",
            "The broker's TLS certificate is expired or expires soon",
            HIGH,
            "Renew the broker's server certificate before it expires (PKI page, docs/pki.md); devices refuse an "
            "expired one.",
            check_tls_certificate_expiry,
        ),
        CheckSpec(
            "tls_client_certificate",
            "The TLS listener accepts clients without a certificate",
            HIGH,
            "Set `require_certificate true` and `use_identity_as_username true` on the TLS listener.",
            check_tls_client_certificate,
        ),
    )
}
