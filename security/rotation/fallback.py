"""Step 4 of the handover: "if refused it falls back to the old one (the device library keeps both) and the console
alerts".

The device library says so itself: after a connect with its previous secret its status message carries
``fallback: true`` and ``refused_credential_id`` (``rot-<rotation id>``, the id the credentials message gave the new
secret). Before the broker switched, that is the handover working as designed (the new secret is not valid yet) and is
only counted. After the switch was applied it means the broker accepted a secret the console removed and refused the
one it installed: the broker does not enforce what was applied (a restored file, a hand edit, another writer), so the
console raises ``rotation_fallback`` on the rotation and asks for a reconcile, which puts the console's policy back and
makes the device reconnect with its new secret.

A device that cannot fall back (the broker refuses both secrets) cannot report anything: that case is
``rotation_unproven`` (no reconnect since the switch), raised by the rotation tick.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from security.models import CredentialRotation, EnforcementChange

from .rows import State, _alert, _append, _step, _switch_change_id

log = logging.getLogger(__name__)

_CREDENTIAL_ID = re.compile(r"^rot-(\d{1,18})$")


def rotations_fallback_seen(*, reports: list[tuple[str, dict]], now: datetime | None = None) -> dict:
    """(client_id, status message) of devices that logged in with their previous secret. Returns counts: alerted
    (after an applied switch), expected (before the switch took effect), unknown (no rotation of that device)."""
    now = now or timezone.now()
    counts = {"alerted": 0, "expected": 0, "unknown": 0}
    by_rotation: dict[int, tuple[str, dict]] = {}
    for client_id, message in reports:
        match = _CREDENTIAL_ID.match(str(message.get("refused_credential_id") or ""))
        if match is None:
            counts["unknown"] += 1
            continue
        by_rotation[int(match.group(1))] = (client_id, message)
    if not by_rotation:
        return counts
    margin = timedelta(seconds=settings.ROTATION_FALLBACK_MARGIN_SECONDS)
    alerted = []
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))
            .filter(pk__in=list(by_rotation), kind=CredentialRotation.Kind.SECRET)
            .select_related("device")
        )
        changes = {row.pk: _switch_change_id(row.history) for row in rows}
        applied = dict(
            EnforcementChange.objects.filter(
                pk__in=[c for c in changes.values() if c], state=EnforcementChange.State.APPLIED
            ).values_list("pk", "applied_at")
        )
        for row in rows:
            client_id, message = by_rotation[row.pk]
            if row.client_id != client_id:  # a report naming another device's rotation: never trusted
                counts["unknown"] += 1
                continue
            applied_at = applied.get(changes[row.pk])
            # Until the reload has dropped the old session and the device has had time to come back, a connect with
            # the previous secret is the handover as designed.
            if row.state not in (State.SWITCHED, State.COMPLETED) or applied_at is None or now < applied_at + margin:
                counts["expected"] += 1
                continue
            row.history = _append(
                row.history,
                _step(
                    "fallback",
                    "alerted",
                    "the broker refused the new secret after the switch and accepted the previous one",
                    at=now,
                ),
            )
            row.save(update_fields=["history", "updated"])
            alerted.append((row, message))
        for row, message in alerted:
            _alert(
                kind="rotation_fallback",
                row=row,
                summary=f"{row.client_id} is back on its previous secret: the broker refused the new one "
                f"(rotation #{row.pk}) after the switch was applied. A broker sync was requested.",
                extra={
                    "credential_id": message.get("credential_id"),
                    "refused_credential_id": message.get("refused_credential_id"),
                },
            )
        if alerted:
            from security.services import reconcile_enqueue

            # The broker accepted a secret the console removed: put the console's policy back (a full render).
            reconcile_enqueue(trigger="rotation-fallback")
    counts["alerted"] = len(alerted)
    if alerted:
        log.warning("rotation: %d devices fell back to their previous secret after the switch", len(alerted))
    return counts
