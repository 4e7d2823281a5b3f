"""Posture checks about listeners and TLS: a plain listener beside TLS, old protocol versions, the server certificate,
client certificates. Each takes the run's Context and returns a Finding (context.py); the catalogue is checks.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl

from cryptography import x509

from .context import (
    CRITICAL,
    FAIL,
    HIGH,
    INFO,
    PASS,
    CheckUnknown,
    Context,
    Finding,
    _code_text,
    _finding,
    _try_connect,
)
from .wire import CLOSED, NO_ANSWER, AuditClient, Identity, Unreachable

# --- listeners and TLS -----------------------------------------------------------------------------------------------


def _tls_context(*, minimum=None, maximum=None, verify_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if verify_ca:
        context.load_verify_locations(cafile=verify_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    if minimum is not None or maximum is not None:
        # Old protocol versions need the lowest security level for OpenSSL 3 to offer them at all.
        context.set_ciphers("ALL:@SECLEVEL=0")
        with _quiet_deprecation():
            if minimum is not None:
                context.minimum_version = minimum
            if maximum is not None:
                context.maximum_version = maximum
    return context


@contextlib.contextmanager
def _quiet_deprecation():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _handshake(ctx: Context, context: ssl.SSLContext) -> tuple[str | None, bytes | None, str]:
    """(negotiated version, server certificate DER, error)."""
    target = ctx.target
    try:
        with socket.create_connection((target.host, target.tls_port), timeout=ctx.timeout()) as raw:
            with context.wrap_socket(raw, server_hostname=target.host) as tls:
                return tls.version(), tls.getpeercert(binary_form=True), ""
    except ssl.SSLError as exc:
        return None, None, f"{exc.reason or exc}"
    except OSError as exc:
        return None, None, f"{type(exc).__name__}: {exc}"


def _require_tls(ctx: Context) -> None:
    target = ctx.target
    if not target.tls_port:
        raise CheckUnknown("no TLS port to audit (none configured or given)")
    if "tls" not in ctx.memo:
        version, _der, error = _handshake(ctx, _tls_context())
        ctx.memo["tls"] = (version, error)
    version, error = ctx.memo["tls"]
    if version is None:
        raise CheckUnknown(f"no TLS handshake on {target.host}:{target.tls_port}: {error}")


CLIENT_SIDE_REFUSALS = ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE")


def check_tls_old_versions(ctx: Context) -> Finding:
    _require_tls(ctx)
    results = {}
    accepted = []
    for name, version in (("TLSv1.0", ssl.TLSVersion.TLSv1), ("TLSv1.1", ssl.TLSVersion.TLSv1_1)):
        try:
            context = _tls_context(minimum=version, maximum=version)
        except (ValueError, ssl.SSLError) as exc:
            raise CheckUnknown(f"this machine's OpenSSL cannot offer {name}: {exc}") from exc
        negotiated, _der, error = _handshake(ctx, context)
        if any(marker in error for marker in CLIENT_SIDE_REFUSALS):
            raise CheckUnknown(f"this machine's OpenSSL refused to offer {name} ({error})")
        results[name] = f"accepted ({negotiated})" if negotiated else f"refused: {error}"
        if negotiated:
            accepted.append(name)
    evidence = {"sent": "TLS handshakes offering only TLS 1.0, then only TLS 1.1", "received": results}
    return _finding("tls_old_versions", FAIL if accepted else PASS, evidence)


def check_tls_certificate_expiry(ctx: Context) -> Finding:
    _require_tls(ctx)
    _version, der, error = _handshake(ctx, _tls_context())
    if der is None:
        raise CheckUnknown(f"no server certificate: {error}")
    certificate = x509.load_der_x509_certificate(der)
    not_after = certificate.not_valid_after_utc
    days_left = (not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    evidence = {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "not_after": not_after.isoformat(),
        "days_left": round(days_left, 1),
    }
    if ctx.target.ca_file:
        verified, _der, verify_error = _handshake(ctx, _tls_context(verify_ca=ctx.target.ca_file))
        evidence["verified_against_ca"] = "yes" if verified else f"no: {verify_error}"
    if days_left < 0:
        return _finding("tls_certificate_expiry", FAIL, evidence, severity=CRITICAL)
    if days_left < ctx.target.expiry_warning_days:
        return _finding("tls_certificate_expiry", FAIL, evidence)
    if evidence.get("verified_against_ca", "yes") != "yes":
        return _finding(
            "tls_certificate_expiry",
            FAIL,
            evidence,
            fix="The broker's certificate does not chain to the fleet's CA: devices verifying it will refuse to "
            "connect. Re-issue it from the PKI page (docs/pki.md).",
        )
    return _finding("tls_certificate_expiry", PASS, evidence)


def check_tls_client_certificate(ctx: Context) -> Finding:
    _require_tls(ctx)
    target = ctx.target
    client = AuditClient(
        target.host, target.tls_port, Identity("anonymous over TLS"), client_id=ctx.client_id("tls"), tls=_tls_context()
    )
    try:
        try:
            code = client.connect(ctx.timeout())
        except Unreachable as exc:
            code, reason = CLOSED, str(exc)
        else:
            reason = client.disconnect_reason
    finally:
        client.close()
    evidence = {
        "sent": "TLS handshake without a client certificate, then an anonymous CONNECT",
        "received": _code_text(code) + (f" ({reason})" if reason and code != 0 else ""),
    }
    required = code in (CLOSED, NO_ANSWER)
    if required:
        return _finding("tls_client_certificate", PASS, evidence)
    if not target.certificates_expected:
        evidence["note"] = "the listener does not require certificates and the fleet does not say it uses them"
        return _finding("tls_client_certificate", PASS, evidence, severity=INFO)
    return _finding("tls_client_certificate", FAIL, evidence)


def check_plain_listener(ctx: Context) -> Finding:
    target = ctx.target
    if target.port is None:
        raise CheckUnknown("no plain MQTT port given")
    # The anonymous check's answer when it ran: one refused login fewer in the broker's log (and the detector's).
    code, received = ctx.memo.get("anonymous_connack") or _try_connect(ctx, Identity("anonymous"), role="plain")
    speaks_mqtt = code not in (NO_ANSWER, CLOSED)
    tls_available = False
    if target.tls_port:
        version, _der, _error = _handshake(ctx, _tls_context())
        tls_available = version is not None
    evidence = {
        "sent": f"a plain-text CONNECT to {target.host}:{target.port}",
        "received": received,
        "tls_listener": f"{target.host}:{target.tls_port} answers TLS" if tls_available else "none reachable",
    }
    if not speaks_mqtt:
        return _finding("plain_listener", PASS, evidence)
    if target.plain_console_only:
        evidence["note"] = (
            "the rendered config binds this listener to 127.0.0.1 and renders no device password on it: only the "
            "console's own identities use it (MQTT_PLAIN_LISTENER is off)"
        )
        return _finding("plain_listener", PASS, evidence)
    if not tls_available:
        return _finding(
            "plain_listener",
            FAIL,
            evidence,
            severity=HIGH,
            fix="There is no TLS listener at all: credentials and messages cross the network in clear. Turn on the "
            "TLS listener (MQTT_TLS_LISTENER) and move devices to it.",
        )
    return _finding("plain_listener", FAIL, evidence)
