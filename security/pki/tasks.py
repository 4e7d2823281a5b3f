"""PKI tasks: after a certificate revocation, cut off a TLS session that is still open with it."""

from celery import shared_task

from security.audit import audit_context


@shared_task(name="security.pki_cut_off_sessions", bind=True, max_retries=5, retry_backoff=True, retry_jitter=True)
def cut_off_sessions(self, client_ids: list[str]) -> dict:
    from security.brokers.base import BrokerUnavailable

    from .sessions import device_sessions_cut_off

    with audit_context(service="pki"):
        try:
            return device_sessions_cut_off(client_ids=client_ids)
        except BrokerUnavailable as exc:
            raise self.retry(exc=exc) from exc
