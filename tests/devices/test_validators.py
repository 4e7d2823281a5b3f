import pytest
from django.core.exceptions import ValidationError

from devices.validators import is_valid_client_id, normalize_mac, validate_client_id


@pytest.mark.parametrize(
    "client_id",
    ["device-1", "device-abc_DEF-123", "device-" + "a" * 64],
)
def test_prefix_rule_accepts_fleet_ids(client_id):
    assert is_valid_client_id(client_id)


@pytest.mark.parametrize(
    "client_id",
    [
        "",
        "device-",  # nothing after the prefix
        "sensor-1",  # another prefix
        "Device-1",  # the prefix is case-sensitive
        "device-" + "a" * 65,  # too long
        "device-a/b",  # would change the topic tree
        "device-#",
        "device-+",
        "#",
        "$SYS",
        "device-a b",
        "xdevice-1",
    ],
)
def test_prefix_rule_refuses_everything_else(client_id):
    assert not is_valid_client_id(client_id)
    with pytest.raises(ValidationError, match="fleet rule"):
        validate_client_id(client_id)


def test_prefix_is_configurable(settings):
    settings.FLEET_CLIENT_ID_PREFIX = "meter-"
    assert is_valid_client_id("meter-42")
    assert not is_valid_client_id("device-42")


def test_pattern_cannot_admit_wildcards_even_if_configured_loosely(settings):
    settings.FLEET_CLIENT_ID_SUFFIX_PATTERN = r".+"
    assert is_valid_client_id("device-ok")
    assert not is_valid_client_id("device-#")
    assert not is_valid_client_id("device-a/b")


@pytest.mark.parametrize("raw", ["00:1A:2B:3C:4D:5E", "00-1a-2b-3c-4d-5e", "001a.2b3c.4d5e", "001A2B3C4D5E"])
def test_mac_forms_normalise(raw):
    assert normalize_mac(raw) == "00:1a:2b:3c:4d:5e"


@pytest.mark.parametrize("raw", ["00:1a:2b:3c:4d", "zz:1a:2b:3c:4d:5e", "hello"])
def test_bad_mac_refused(raw):
    with pytest.raises(ValidationError, match="not a MAC"):
        normalize_mac(raw)
