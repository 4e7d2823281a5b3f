"""Device replies (acks on tx/<id>/ack, CSRs on tx/<id>/csr, statuses reporting a fallback to the previous secret)
handed over by the MQTT consumer once per batch.

Runs in the consumer's thread, so it must be quick and must never raise: acks for `credentials` are confirmed in one
transaction per batch (security.rotation.services.rotations_confirm), the switch is a task enqueued after commit.
CSRs and certificate acks go to the certificate rotation module; acks for `firmware_offer` to the firmware registry
(devices/firmware/services.py, one transaction per batch). Anything else (acks for commands the console does not
track here) is ignored.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

CREDENTIALS = "credentials"
CERTIFICATE_COMMANDS = ("certificate_renew", "certificate")

# What the inbox saw since the process started (for tests and the consumer's log line).
stats: Counter = Counter()


def route(replies: list[tuple[str, str, dict]]) -> tuple[list[tuple[str, str, str, str]], list, list, list]:
    """Pure: split one batch into credential acks (client_id, command_id, status, detail), CSRs, certificate
    acks (client_id, message) and fallback reports (client_id, status message: a rotated secret was refused)."""
    credential_acks, csrs, certificate_acks, fallbacks = [], [], [], []
    for client_id, channel, message in replies:
        if channel == "status":
            if message.get("fallback"):
                fallbacks.append((client_id, message))
        elif channel == "csr":
            csrs.append((client_id, message))
        elif channel == "ack":
            command = message.get("command")
            if command == CREDENTIALS:
                credential_acks.append(
                    (client_id, str(message.get("id", "")), str(message.get("status", "")), message.get("detail") or "")
                )
            elif command in CERTIFICATE_COMMANDS:
                certificate_acks.append((client_id, message))
    return credential_acks, csrs, certificate_acks, fallbacks


def device_replies_received(replies: list[tuple[str, str, dict]]) -> None:
    """(client_id, channel, decoded message) for every ack and CSR of one consumer batch, and every status that
    reports a fallback to the previous secret."""
    credential_acks, csrs, certificate_acks, fallbacks = route(replies)
    stats["replies"] += len(replies)
    if fallbacks:
        try:
            from .fallback import rotations_fallback_seen

            stats.update({f"fallback_{k}": v for k, v in rotations_fallback_seen(reports=fallbacks).items()})
        except Exception:  # never take the consumer down
            stats["errors"] += 1
            log.exception("rotation inbox: %d fallback reports failed", len(fallbacks))
    _firmware_acks(replies)
    if credential_acks:
        try:
            from .services import rotations_confirm

            counts = rotations_confirm(acks=credential_acks)
            stats.update({f"credentials_{k}": v for k, v in counts.items()})
        except Exception:  # never take the consumer down; the rows stay delivered and are re-sent by the tick
            stats["errors"] += 1
            log.exception("rotation inbox: confirming %d credential acks failed", len(credential_acks))
    if csrs or certificate_acks:
        try:
            from . import certificates
        except ImportError:
            stats["certificate_unhandled"] += len(csrs) + len(certificate_acks)
            return
        for handler, items in ((certificates.csr_received, csrs), (certificates.certificate_acked, certificate_acks)):
            for client_id, message in items:
                try:
                    handler(client_id=client_id, message=message)
                except Exception:
                    stats["errors"] += 1
                    log.exception("rotation inbox: %s for %s failed", handler.__name__, client_id)


FIRMWARE_OFFER = "firmware_offer"


def _firmware_acks(replies: list[tuple[str, str, dict]]) -> None:
    """Answers to firmware offers go to the firmware registry (devices/firmware/services.py)."""
    acks = [
        (client_id, str(message.get("id", "")), str(message.get("status", "")), message.get("detail") or "")
        for client_id, channel, message in replies
        if channel == "ack" and message.get("command") == FIRMWARE_OFFER
    ]
    if not acks:
        return
    try:
        from devices.firmware.services import firmware_offers_answered

        counts = firmware_offers_answered(acks=acks)
        stats.update({f"firmware_{k}": v for k, v in counts.items()})
    except Exception:  # never take the consumer down
        stats["errors"] += 1
        log.exception("rotation inbox: recording %d firmware offer answers failed", len(acks))
