"""Validation of device identities. The rules here are what keeps MQTT wildcards and '$' out of topics."""

import re
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ValidationError


@lru_cache(maxsize=8)
def _client_id_regex(prefix: str, suffix_pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + f"(?:{suffix_pattern})")


def client_id_rule() -> str:
    """The rule in words, for error messages and help texts."""
    return f"'{settings.FLEET_CLIENT_ID_PREFIX}' followed by {settings.FLEET_CLIENT_ID_SUFFIX_PATTERN}"


def is_valid_client_id(value: str) -> bool:
    regex = _client_id_regex(settings.FLEET_CLIENT_ID_PREFIX, settings.FLEET_CLIENT_ID_SUFFIX_PATTERN)
    # Belt and braces: whatever the configured pattern, never admit characters that change MQTT topic meaning.
    return bool(regex.fullmatch(value)) and not any(c in value for c in "#+/$ \t\r\n\x00")


def validate_client_id(value: str) -> None:
    if not is_valid_client_id(value):
        raise ValidationError(
            "Client id %(value)r does not match the fleet rule: %(rule)s.",
            code="client_id_prefix",
            params={"value": value, "rule": client_id_rule()},
        )


_MAC_RE = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: str) -> str:
    """Accept aa:bb:cc:dd:ee:ff, AA-BB-..., aabb.ccdd.eeff or bare hex; store lower-case colon form."""
    if not value:
        return ""
    bare = re.sub(r"[\s:.\-]", "", value).lower()
    if not _MAC_RE.match(bare):
        raise ValidationError(
            "%(value)r is not a MAC address; use six hex pairs such as 00:1a:2b:3c:4d:5e.",
            code="invalid_mac",
            params={"value": value},
        )
    return ":".join(bare[i : i + 2] for i in range(0, 12, 2))


def validate_mac(value: str) -> None:
    normalize_mac(value)
