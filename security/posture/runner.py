"""Runs the checks against one target, each bounded in time, and summarises the findings. No Django import.

Order matters: the refused logins (anonymous, the default credentials) come first and the console's probe identity
logs in right after them from the same address, which tells the broker-log monitor they were the console's own
(security/detection/monitor.py drops held refusals when the probe connects).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .checks import CHECKS
from .context import FAIL, PASS, SEVERITIES, UNKNOWN, CheckUnknown, Context, Finding, Target
from .wire import Unreachable

ORDER = (
    "anonymous_connect",
    "default_credentials",
    "client_id_outside_prefix",
    "device_publish_other",
    "device_read_other_rx",
    "device_read_other_tx",
    "wildcard_hash",
    "wildcard_plus",
    "wildcard_sys",
    "sys_readable_by_devices",
    "retained_readable",
    "oversize_publish",
    "plain_listener",
    "tls_old_versions",
    "tls_certificate_expiry",
    "tls_client_certificate",
)
assert set(ORDER) == set(CHECKS), "every check has a place in ORDER"


@dataclass
class AuditResult:
    target: dict
    findings: list[Finding] = field(default_factory=list)
    duration_ms: float = 0.0

    def summary(self) -> dict:
        counts = {status: 0 for status in (FAIL, PASS, UNKNOWN)}
        failed = {severity: 0 for severity in SEVERITIES}
        for finding in self.findings:
            counts[finding.status] += 1
            if finding.status == FAIL:
                failed[finding.severity] += 1
        return {**counts, "failed_by_severity": failed, "total": len(self.findings)}


def _unknown(check_id: str, why: str, evidence: dict | None = None) -> Finding:
    spec = CHECKS[check_id]
    return Finding(
        id=check_id,
        title=spec.title,
        severity=spec.severity,
        status=UNKNOWN,
        evidence={**(evidence or {}), "why": why},
        fix=spec.fix,
    )


def run_check(ctx: Context, check_id: str, budget: float) -> Finding:
    """One check in its own thread, abandoned (and reported unknown) past ``budget`` seconds: a broker that stops
    answering halfway through a check cannot stall the audit."""
    outcome: list[Finding] = []

    def work():
        try:
            outcome.append(CHECKS[check_id].run(ctx))
        except CheckUnknown as exc:
            outcome.append(_unknown(check_id, str(exc)))
        except Unreachable as exc:
            outcome.append(_unknown(check_id, f"the broker does not answer: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a check must report, never crash the audit
            outcome.append(_unknown(check_id, f"the check failed to run: {type(exc).__name__}: {exc}"))

    started = time.monotonic()
    thread = threading.Thread(target=work, name=f"posture-{check_id}", daemon=True)
    thread.start()
    thread.join(max(0.1, budget))
    finding = outcome[0] if outcome else _unknown(check_id, f"the check did not finish within {budget:.1f} s")
    finding.duration_ms = round((time.monotonic() - started) * 1000, 1)
    return finding


def audit_run(
    target: Target,
    *,
    total_timeout: float = 20.0,
    check_timeout: float = 3.0,
    only: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> AuditResult:
    """Every check (or ``only`` those) in ORDER. The whole audit stays within ``total_timeout``: checks left when it
    runs out are reported unknown."""
    started = time.monotonic()
    deadline = started + total_timeout
    ctx = Context(target=target, check_timeout=check_timeout, deadline=deadline)
    ids = [c for c in ORDER if only is None or c in only]
    result = AuditResult(target=target.describe())
    for index, check_id in enumerate(ids):
        if progress is not None:
            progress(index, len(ids), check_id)
        left = deadline - time.monotonic()
        if left <= 0.2:
            result.findings.append(_unknown(check_id, f"the audit ran out of its {total_timeout:.0f} s"))
            continue
        result.findings.append(run_check(ctx, check_id, budget=min(left, 3 * check_timeout)))
    if progress is not None:
        progress(len(ids), len(ids), "")
    result.duration_ms = round((time.monotonic() - started) * 1000, 1)
    return result


__all__ = ["ORDER", "PASS", "AuditResult", "audit_run", "run_check"]
