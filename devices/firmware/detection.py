"""What detection makes of a device's firmware (security/detection/ingest.py calls ``firmware_findings`` for each
status message; ``firmware_model_check`` re-judges every device of a model when its registry changes).

Reads only the DeviceModel row (latest_firmware, minimum_firmware, firmware_flags), which the registry keeps derived
(devices.firmware.services.device_model_firmware_sync), so a status message costs no query. Most severe first, one
finding per device:
  running a release marked known-vulnerable   -> firmware_vulnerable (critical)
  below the minimum secure version            -> firmware_below_minimum (critical)
  running a withdrawn release                 -> firmware_withdrawn (medium)
  older than the latest release               -> firmware_outdated (low: a warning, not an incident)
"""

from __future__ import annotations

from devices.models import Device, DeviceModel
from security.detection import rules

from . import versions


def _older(running: str, than: str) -> bool:
    """Only versions in the registry's format are ordered (devices/firmware/versions.py); a running version outside
    it ("weird-build") is not guessed at: no stale or below-minimum verdict, though an exact flagged version still
    counts."""
    order = versions.compare(running, than)
    return order is not None and order < 0


def verdict(model: DeviceModel, running: str) -> tuple[str, dict]:
    """(alert kind or "", evidence)."""
    if not running:
        return "", {}
    evidence = {"running": running, "latest": model.latest_firmware, "minimum": model.minimum_firmware}
    flags = {}
    if versions.parse(running) is not None and model.firmware_flags:
        flags = model.firmware_flags.get(versions.sort_key(running)) or {}
    if flags.get("vulnerable"):
        return "firmware_vulnerable", {**evidence, "advisory": flags.get("advisory", "")}
    if model.minimum_firmware and _older(running, model.minimum_firmware):
        return "firmware_below_minimum", evidence
    if flags.get("withdrawn"):
        return "firmware_withdrawn", evidence
    if model.latest_firmware and _older(running, model.latest_firmware):
        return "firmware_outdated", evidence
    return "", evidence


def firmware_findings(device: Device, firmware: str) -> list[rules.Finding]:
    model = device.model
    kind, evidence = verdict(model, firmware)
    if not kind:
        return []
    summaries = {
        "firmware_vulnerable": f"{device.client_id} runs {firmware}, marked known-vulnerable: "
        f"{evidence.get('advisory', '')[:160]}",
        "firmware_below_minimum": f"{device.client_id} runs {firmware}, below the minimum secure "
        f"{model.minimum_firmware}",
        "firmware_withdrawn": f"{device.client_id} runs {firmware}, a withdrawn release of {model.name}",
        "firmware_outdated": f"{device.client_id} runs {firmware}; {model.name} is at {model.latest_firmware}",
    }
    return [
        rules.Finding(
            kind, subject=device.client_id, client_id=device.client_id, summary=summaries[kind], evidence=evidence
        )
    ]


def firmware_model_check(*, model_id: int, chunk: int = 500) -> dict:
    """Every device of the model that reported a version, judged against the registry now; alerts raised in chunks
    (an open alert of the same kind just gains an occurrence). Returns counts per kind."""
    from security.detection.ingest import raise_findings

    model = DeviceModel.objects.filter(pk=model_id).first()
    if model is None:
        return {}
    counts: dict[str, int] = {}
    findings: list[rules.Finding] = []
    rows = (
        Device.objects.filter(model_id=model_id, status__in=[Device.Status.ACTIVE, Device.Status.QUARANTINED])
        .exclude(firmware_version="")
        .order_by("pk")
        .only("id", "client_id", "firmware_version", "model_id")
    )
    for device in rows.iterator(chunk_size=chunk):
        device.model = model
        for finding in firmware_findings(device, device.firmware_version):
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
            findings.append(finding)
        if len(findings) >= chunk:
            raise_findings(findings)
            findings = []
    raise_findings(findings)
    return counts
