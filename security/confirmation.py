"""The typed confirmation of an action on a filtered set of devices: the person types how many devices the preview
showed, and the action runs only if the filters still match exactly that many (a fleet that changed between the
preview and the click is shown again instead of acted on). One check for bulk revocation, rotation campaigns and
rotating a filtered set, so every form accepts the same input and says the same thing."""

from __future__ import annotations

from django.core.exceptions import ValidationError


def typed_count(value) -> int | None:
    """What the person typed, as a number: "1,000" and " 1000 " are 1000; anything else is None."""
    text = str(value if value is not None else "").strip().replace(",", "").replace("_", "")
    return int(text) if text.isdigit() else None


def typed_count_check(*, typed, matched: int, can: str) -> None:
    """ValidationError on ``confirm_count`` unless ``typed`` is ``matched``. ``can`` completes "devices that …":
    "can be revoked now", "can rotate now"."""
    if typed_count(typed) != matched:
        plural = "s" if matched != 1 else ""
        raise ValidationError(
            {"confirm_count": [f"These filters match {matched} device{plural} that {can}; type {matched} to confirm."]}
        )
