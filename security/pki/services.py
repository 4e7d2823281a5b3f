"""PKI services: create (or import) the CAs, issue device and broker certificates, keep the CRL, revoke.

They store, audit and enqueue enforcement; the cryptography is in ``ca``, ``csr`` and ``crl``. Rendering the broker
files reads ``broker_tls_material()``, so a revocation reaches the broker through the same outbox, reload and probe
as every other enforcement change (docs/pki.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.models import Device
from security.audit import audit_context, audit_record, current_context
from security.brokers.render import TlsMaterial
from security.models import BrokerServerCertificate, CertificateAuthority, DeviceCertificate
from security.permissions import user_can

from . import ca as pki_ca
from .crl import crl_build
from .csr import CsrError, csr_check, csr_load, device_cert_sign, key_description

logger = logging.getLogger(__name__)

ISSUE_PERMISSION = "devices.issue_credentials"
# Whoever may revoke a device may revoke one of its certificates; decommissioning (devices.change_device) revokes
# all of them through the status-change hook.
REVOKE_PERMISSION = "devices.revoke_device"
HOOK_PERMISSIONS = ("devices.revoke_device", "devices.change_device")
SERVER_RENEW_BEFORE = dt.timedelta(days=30)


def _authorise(actor, permissions: tuple[str, ...] | str) -> None:
    permissions = (permissions,) if isinstance(permissions, str) else permissions
    if actor is None:
        if current_context().service:
            return
        raise PermissionDenied("No actor: call this as a user, or inside audit_context(service=...) as a service.")
    if not any(user_can(actor, p) for p in permissions):
        raise PermissionDenied(f"Your role does not allow this ({' or '.join(permissions)}).")


def _passphrase() -> str:
    return settings.FLEET_PKI_KEY


def _serial_hex(serial: int) -> str:
    return format(serial, "X")


def _cert_fields(cert) -> dict:
    return {
        "subject": cert.subject.rfc4514_string()[:255],
        "serial": _serial_hex(cert.serial_number),
        "fingerprint": pki_ca.fingerprint(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "certificate_pem": pki_ca.cert_pem(cert),
    }


# --- the CAs -------------------------------------------------------------------------------------------------


def pki_ensure() -> CertificateAuthority:
    """The active issuing CA; on first use create the fleet root CA and an issuing CA under it."""
    issuing = CertificateAuthority.objects.filter(role=CertificateAuthority.Role.ISSUING, active=True).first()
    if issuing is not None:
        return issuing
    organisation = settings.PKI_ORGANISATION
    root_key, root_cert = pki_ca.root_ca_create(
        common_name=f"{organisation} fleet root CA", organisation=organisation, days=settings.PKI_ROOT_DAYS
    )
    issuing_key, issuing_cert = pki_ca.issuing_ca_create(
        root_key=root_key,
        root_cert=root_cert,
        common_name=f"{organisation} device issuing CA",
        organisation=organisation,
        days=settings.PKI_ISSUING_DAYS,
    )
    try:
        with transaction.atomic(), audit_context(service="pki"):
            root = CertificateAuthority.objects.create(
                role=CertificateAuthority.Role.ROOT,
                encrypted_key_pem=pki_ca.encrypt_key(root_key, _passphrase()),
                **_cert_fields(root_cert),
            )
            issuing = CertificateAuthority.objects.create(
                role=CertificateAuthority.Role.ISSUING,
                encrypted_key_pem=pki_ca.encrypt_key(issuing_key, _passphrase()),
                chain_pem=root.certificate_pem,
                **_cert_fields(issuing_cert),
            )
            for row in (root, issuing):
                audit_record(
                    actor=None,
                    action="pki.ca_create",
                    target=row,
                    after={"role": row.role, "subject": row.subject, "serial": row.serial, "not_after": row.not_after},
                )
    except IntegrityError:  # another process created them at the same moment: use theirs
        return CertificateAuthority.objects.get(role=CertificateAuthority.Role.ISSUING, active=True)
    return issuing


def ca_chain_pem(issuing: CertificateAuthority | None = None) -> str:
    """Issuing CA then everything above it: what devices and the broker trust."""
    issuing = issuing or pki_ensure()
    return issuing.certificate_pem + issuing.chain_pem


def root_ca() -> CertificateAuthority | None:
    return CertificateAuthority.objects.filter(role=CertificateAuthority.Role.ROOT, active=True).first()


def _issuing_key(issuing: CertificateAuthority):
    return pki_ca.decrypt_key(issuing.encrypted_key_pem, _passphrase())


def ca_import(
    *, actor, certificate_pem: str, key_pem: str, chain_pem: str, key_password: str = ""
) -> CertificateAuthority:
    """Use an operator's issuing CA (signed elsewhere) instead of the built-in one. Certificates already issued
    by the previous CA stay listed (and revocable); devices must trust the new chain."""
    from cryptography.hazmat.primitives import serialization

    try:
        cert = pki_ca.load_cert(certificate_pem)
        chain = pki_ca.load_certs(chain_pem) if chain_pem.strip() else []
        key = serialization.load_pem_private_key(key_pem.encode(), password=key_password.encode() or None)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"Could not read the CA certificate, chain or key: {exc}") from exc
    if not pki_ca.is_ca(cert):
        raise ValidationError("The certificate is not a CA certificate (basicConstraints CA:TRUE is missing).")
    if not pki_ca.keys_match(key, cert):
        raise ValidationError("The private key does not belong to the CA certificate.")
    if cert.not_valid_after_utc <= pki_ca.now():
        raise ValidationError("The CA certificate has expired.")
    issuer = cert
    for parent in chain:
        if not pki_ca.signed_by(issuer, parent):
            raise ValidationError(
                f"The chain is not in order: {issuer.subject.rfc4514_string()} is not signed by "
                f"{parent.subject.rfc4514_string()}."
            )
        issuer = parent
    if chain and not pki_ca.signed_by(chain[-1], chain[-1]):
        raise ValidationError("The chain must end with the self-signed root certificate.")
    if not chain and not pki_ca.signed_by(cert, cert):
        raise ValidationError("Give the chain up to the root (the issuing CA is not self-signed).")
    with transaction.atomic():
        CertificateAuthority.objects.filter(active=True).update(active=False)
        if chain:
            root_cert = chain[-1]
            CertificateAuthority.objects.create(
                role=CertificateAuthority.Role.ROOT, imported=True, **_cert_fields(root_cert)
            )
        issuing = CertificateAuthority.objects.create(
            role=CertificateAuthority.Role.ISSUING,
            imported=True,
            encrypted_key_pem=pki_ca.encrypt_key(key, _passphrase()),
            chain_pem="".join(pki_ca.cert_pem(c) for c in chain),
            **_cert_fields(cert),
        )
        BrokerServerCertificate.objects.filter(active=True).update(active=False)
        audit_record(
            actor=actor,
            action="pki.ca_import",
            target=issuing,
            after={"subject": issuing.subject, "serial": issuing.serial, "chain_length": len(chain)},
        )
        _enqueue(kind="pki.ca_import", client_id="", summary=issuing.subject, actor=actor)
    return issuing


# --- the broker's server certificate ------------------------------------------------------------------------


def broker_hosts() -> list[str]:
    hosts = [settings.MQTT_PUBLIC_HOST, settings.MQTT_HOST, *settings.PKI_BROKER_HOSTS, "localhost", "127.0.0.1"]
    return list(dict.fromkeys(h for h in hosts if h and h not in ("0.0.0.0", "::")))  # noqa: S104 (never a name)


def broker_server_cert_ensure(issuing: CertificateAuthority | None = None) -> BrokerServerCertificate:
    """Issued on first use, and again when the host names change, the issuing CA changes or it nears expiry."""
    issuing = issuing or pki_ensure()
    hosts = broker_hosts()
    current = BrokerServerCertificate.objects.filter(active=True).first()
    if (
        current is not None
        and current.issuer_id == issuing.pk
        and current.hosts == hosts
        and current.not_after - timezone.now() > SERVER_RENEW_BEFORE
    ):
        return current
    key, cert = pki_ca.server_cert_create(
        issuer_key=_issuing_key(issuing),
        issuer_cert=pki_ca.load_cert(issuing.certificate_pem),
        hosts=hosts,
        days=settings.PKI_SERVER_CERT_DAYS,
    )
    fields = _cert_fields(cert)
    fields.pop("subject")
    with transaction.atomic(), audit_context(service="pki"):
        BrokerServerCertificate.objects.filter(active=True).update(active=False)
        row = BrokerServerCertificate.objects.create(
            issuer=issuing, hosts=hosts, encrypted_key_pem=pki_ca.encrypt_key(key, _passphrase()), **fields
        )
        audit_record(
            actor=None,
            action="pki.broker_certificate_issue",
            object_type="broker",
            object_id="mosquitto",
            after={"serial": row.serial, "hosts": hosts, "not_after": row.not_after},
        )
    return row


# --- the CRL ------------------------------------------------------------------------------------------------


def _effectively_revoked(issuing: CertificateAuthority):
    """Certificates of this CA the broker must refuse: revoked ones, and every certificate of a device that is
    revoked, decommissioned or deleted (so a device status change bites even without an explicit revocation).
    Expired ones drop off: OpenSSL refuses them anyway."""
    from django.db.models import Q

    return (
        DeviceCertificate.objects.filter(issuer=issuing, not_after__gt=timezone.now())
        .filter(
            Q(status=DeviceCertificate.Status.REVOKED)
            | Q(device__isnull=True)
            | Q(device__status__in=[Device.Status.REVOKED, Device.Status.DECOMMISSIONED])
        )
        .order_by("serial")
    )


def crl_current(issuing: CertificateAuthority | None = None) -> str:
    """The stored CRL, re-signed only when the revoked set changes or half its validity has passed: rendering is
    then stable (the same bytes, the same policy digest) until something was revoked."""
    issuing = issuing or pki_ensure()
    rows = list(_effectively_revoked(issuing).values_list("serial", "revoked_at", "created", "reason", "status"))
    content = hashlib.sha256("\n".join(r[0] for r in rows).encode()).hexdigest()
    now = timezone.now()
    half = dt.timedelta(days=settings.PKI_CRL_DAYS) / 2
    if (
        issuing.crl_pem
        and issuing.crl_content == content
        and issuing.crl_next_update is not None
        and issuing.crl_next_update - now > half
    ):
        return issuing.crl_pem
    entries = [
        (int(serial, 16), revoked_at or created, "key_compromise" if status == "revoked" else "cessation_of_operation")
        for serial, revoked_at, created, reason, status in rows
    ]
    number = issuing.crl_number + 1
    this_update = now.replace(microsecond=0) - dt.timedelta(minutes=5)
    next_update = this_update + dt.timedelta(days=settings.PKI_CRL_DAYS)
    pem = crl_build(
        issuer_key=_issuing_key(issuing),
        issuer_cert=pki_ca.load_cert(issuing.certificate_pem),
        revoked=entries,
        this_update=this_update,
        next_update=next_update,
        number=number,
    )
    CertificateAuthority.objects.filter(pk=issuing.pk).update(
        crl_pem=pem, crl_number=number, crl_this_update=this_update, crl_next_update=next_update, crl_content=content
    )
    issuing.crl_pem, issuing.crl_number, issuing.crl_content = pem, number, content
    issuing.crl_this_update, issuing.crl_next_update = this_update, next_update
    return pem


# --- what the broker files need ------------------------------------------------------------------------------


def denied_usernames() -> tuple[str, ...]:
    """Device usernames whose certificate sessions must be cut off: they have a certificate that the broker now
    refuses, and nothing the broker still accepts (no active certificate, no password credential, or a device status
    that takes it off the broker). A device re-issued a new certificate is not denied: its old session is taken over
    by ``device_sessions_cut_off`` instead (docs/pki.md)."""
    from django.db.models import Exists, OuterRef

    now = timezone.now()
    usable_cert = DeviceCertificate.objects.filter(
        client_id=OuterRef("client_id"), status=DeviceCertificate.Status.ACTIVE, not_after__gt=now
    )
    names = set()
    rows = (
        DeviceCertificate.objects.filter(not_after__gt=now)
        .annotate(usable=Exists(usable_cert))
        .values_list("client_id", "status", "device__status", "device__credential__id", "usable")
    )
    for client_id, status, device_status, credential_id, usable in rows:
        off_broker = device_status not in (Device.Status.ACTIVE, Device.Status.QUARANTINED)
        if off_broker or (status == DeviceCertificate.Status.REVOKED and not usable and credential_id is None):
            names.add(client_id)
    return tuple(sorted(names))


def broker_tls_material() -> TlsMaterial | None:
    """None when the TLS listener is turned off (settings.MQTT_TLS_LISTENER)."""
    if not settings.MQTT_TLS_LISTENER:
        return None
    issuing = pki_ensure()
    server = broker_server_cert_ensure(issuing)
    return TlsMaterial(
        ca_chain=ca_chain_pem(issuing),
        server_cert=server.certificate_pem,
        server_key=pki_ca.plain_key_pem(pki_ca.decrypt_key(server.encrypted_key_pem, _passphrase())),
        crl=crl_current(issuing),
        denied=denied_usernames(),
        quarantined=tuple(
            DeviceCertificate.objects.filter(
                device__status=Device.Status.QUARANTINED,
                status=DeviceCertificate.Status.ACTIVE,
                not_after__gt=timezone.now(),
            )
            .order_by("client_id")
            .values_list("client_id", flat=True)
            .distinct()
        ),
    )


# --- device certificates -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    record: DeviceCertificate
    certificate_pem: str
    chain_pem: str
    private_key_pem: str = field(default="", repr=False)  # factory bundles only; never stored


def _lifetime(days: int | None) -> int:
    days = days or settings.PKI_DEVICE_CERT_DAYS
    if not 1 <= days <= settings.PKI_DEVICE_CERT_MAX_DAYS:
        raise ValidationError(f"A device certificate lives 1 to {settings.PKI_DEVICE_CERT_MAX_DAYS} days, not {days}.")
    return days


def _device_can_hold_certificate(device: Device) -> None:
    if device.status in (Device.Status.REVOKED, Device.Status.DECOMMISSIONED):
        raise ValidationError(
            f"{device.client_id} is {device.get_status_display().lower()}: reinstate it before issuing a certificate."
        )


def _store(
    *, actor, device: Device, issuing: CertificateAuthority, leaf, source: str, action: str
) -> DeviceCertificate:
    cert = leaf.certificate
    record = DeviceCertificate.objects.create(
        device=device,
        client_id=device.client_id,
        issuer=issuing,
        serial=_serial_hex(cert.serial_number),
        fingerprint=pki_ca.fingerprint(cert),
        key_type=key_description(cert.public_key()),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        certificate_pem=pki_ca.cert_pem(cert),
        source=source,
        issued_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    audit_record(
        actor=actor,
        action=action,
        target=device,
        after={
            "serial": record.serial,
            "fingerprint": record.fingerprint,
            "key_type": record.key_type,
            "not_after": record.not_after,
            "source": source,
        },
    )
    # Issuing changes what the broker denies (a device with only revoked certificates may be usable again).
    _enqueue(
        kind="certificate.issue", client_id=device.client_id, summary=f"certificate {record.serial[:16]}", actor=actor
    )
    return record


def certificate_issue_from_csr(*, actor, device: Device, csr_pem: str, days: int | None = None) -> IssuedCertificate:
    """Check the CSR (signature, key type and size, CN = client id) and sign it: CN = client id, clientAuth only."""
    _authorise(actor, ISSUE_PERMISSION)
    days = _lifetime(days)
    try:
        csr = csr_load(csr_pem)
        csr_check(csr, client_id=device.client_id)
    except CsrError as exc:
        raise ValidationError({"csr": [str(exc)]}) from exc
    record, issuing = _sign_and_store(
        actor=actor,
        device=device,
        public_key=csr.public_key(),
        days=days,
        source=DeviceCertificate.Source.CSR,
        action="certificate.issue",
    )
    return IssuedCertificate(record=record, certificate_pem=record.certificate_pem, chain_pem=ca_chain_pem(issuing))


def _sign_and_store(*, actor, device: Device, public_key, days: int, source: str, action: str):
    """Sign a device certificate for ``public_key`` with the issuing CA and record it (audited), under a row lock
    on the device so a concurrent revoke cannot slip between the check and the issue."""
    issuing = pki_ensure()
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device.pk)
        _device_can_hold_certificate(device)
        leaf = device_cert_sign(
            issuer_key=_issuing_key(issuing),
            issuer_cert=pki_ca.load_cert(issuing.certificate_pem),
            client_id=device.client_id,
            public_key=public_key,
            days=days,
        )
        record = _store(actor=actor, device=device, issuing=issuing, leaf=leaf, source=source, action=action)
    return record, issuing


def certificate_factory_bundle(*, actor, device: Device, days: int | None = None) -> IssuedCertificate:
    """Factory provisioning: the console makes the key (EC P-256) and the certificate; the key is returned once and
    never stored. Prefer device-side CSRs wherever the device can make one."""
    _authorise(actor, ISSUE_PERMISSION)
    days = _lifetime(days)
    key = pki_ca.new_ec_key()
    record, issuing = _sign_and_store(
        actor=actor,
        device=device,
        public_key=key.public_key(),
        days=days,
        source=DeviceCertificate.Source.FACTORY,
        action="certificate.factory_issue",
    )
    return IssuedCertificate(
        record=record,
        certificate_pem=record.certificate_pem,
        chain_pem=ca_chain_pem(issuing),
        private_key_pem=pki_ca.plain_key_pem(key),
    )


def _enqueue(*, kind: str, client_id: str, summary: str, actor) -> None:
    from security.services import enforcement_enqueue

    enforcement_enqueue(kind=kind, client_id=client_id, summary=summary[:255], actor=actor)


def _revoke_rows(*, actor, rows: list[DeviceCertificate], reason: str) -> int:
    now = timezone.now()
    for record in rows:
        DeviceCertificate.objects.filter(pk=record.pk).update(
            status=DeviceCertificate.Status.REVOKED, revoked_at=now, reason=reason[:255]
        )
        audit_record(
            actor=actor,
            action="certificate.revoke",
            object_type="devicecertificate",
            object_id=record.client_id,
            before={"serial": record.serial, "status": record.status},
            after={"serial": record.serial, "status": "revoked", "reason": reason, "fingerprint": record.fingerprint},
        )
    return len(rows)


def certificate_revoke(*, actor, certificate: DeviceCertificate, reason: str) -> DeviceCertificate:
    """Revoke one certificate: it goes on the CRL, the broker reloads, new handshakes with it are refused; a session
    already open with it is cut off after the reload (``device_sessions_cut_off``)."""
    _authorise(actor, REVOKE_PERMISSION)
    if not (reason or "").strip():
        raise ValidationError({"reason": ["Say why the certificate is revoked (it goes into the audit log)."]})
    with transaction.atomic():
        record = DeviceCertificate.objects.select_for_update().get(pk=certificate.pk)
        if record.status == DeviceCertificate.Status.REVOKED:
            raise ValidationError("This certificate is already revoked.")
        _revoke_rows(actor=actor, rows=[record], reason=reason)
        _enqueue(kind="certificate.revoke", client_id=record.client_id, summary=reason, actor=actor)
        _schedule_cut_off([record.client_id])
    record.refresh_from_db()
    return record


def device_certificates_revoke(*, actor, device: Device, reason: str) -> int:
    """Revoke every active certificate of a device (the hook for device revoke and decommission). Call it inside
    the caller's transaction; returns how many were revoked."""
    _authorise(actor, HOOK_PERMISSIONS)
    with transaction.atomic():
        rows = list(
            DeviceCertificate.objects.select_for_update().filter(device=device, status=DeviceCertificate.Status.ACTIVE)
        )
        if not rows:
            return 0
        _revoke_rows(actor=actor, rows=rows, reason=reason or "device certificates revoked")
        _enqueue(
            kind="certificate.revoke", client_id=device.client_id, summary=reason or "all certificates", actor=actor
        )
        _schedule_cut_off([device.client_id])
    return len(rows)


def _schedule_cut_off(client_ids: list[str]) -> None:
    from security.pki.tasks import cut_off_sessions

    def send():
        try:
            cut_off_sessions.delay(client_ids)
        except Exception:  # Redis down: the ACL deny (when it applies) and the CRL still hold
            logger.exception("could not enqueue the session cut-off for %s", client_ids)

    transaction.on_commit(send)


def certificate_list(*, device: Device):
    return DeviceCertificate.objects.filter(client_id=device.client_id).select_related("issuer").order_by("-created")


def _ca_dict(row: CertificateAuthority | None) -> dict | None:
    if row is None:
        return None
    return {
        "role": row.role,
        "subject": row.subject,
        "serial": row.serial,
        "fingerprint": row.fingerprint,
        "not_before": row.not_before,
        "not_after": row.not_after,
        "imported": row.imported,
        "certificate": row.certificate_pem,
    }


def pki_overview() -> dict:
    """The CA page and API: the CAs, the chain devices trust, the broker certificate and the CRL's state."""
    issuing = pki_ensure()
    server = BrokerServerCertificate.objects.filter(active=True).first()
    return {
        "issuing": _ca_dict(issuing),
        "root": _ca_dict(root_ca()),
        "chain": ca_chain_pem(issuing),
        "broker": {
            "host": settings.MQTT_PUBLIC_HOST,
            "tls_port": settings.MQTT_TLS_PORT,
            "tls_listener": settings.MQTT_TLS_LISTENER,
            "plain_listener": settings.MQTT_PLAIN_LISTENER,
            "server_certificate": {
                "serial": server.serial,
                "fingerprint": server.fingerprint,
                "hosts": server.hosts,
                "not_after": server.not_after,
            }
            if server
            else None,
            "crl_number": issuing.crl_number,
            "crl_next_update": issuing.crl_next_update,
        },
        "device_certificate_days": settings.PKI_DEVICE_CERT_DAYS,
    }
