"""The pure rule logic: log parsing, attribution, thresholds, fingerprints, baselines, firmware."""

import pytest

from security.detection import baseline, rules
from security.detection.consumer import check_telemetry

RX = ("command", "config", "credentials", "firmware")


def test_connect_lines_are_parsed_with_their_fingerprint():
    event = rules.parse_log_line(
        "1763788800: New client connected from 10.1.2.3:39185 as device-1 (p5, c0, k60, u'device-1')."
    )
    assert (event.kind, event.client_id, event.address, event.port) == ("connected", "device-1", "10.1.2.3", 39185)
    assert (event.protocol, event.clean, event.keepalive) == (5, 0, 60)
    assert rules.fingerprint(event) == "p5 c0 k60 10.1.2.0/24"


@pytest.mark.parametrize(
    ("line", "kind", "client_id"),
    [
        ("New connection from 127.0.0.1:40116 on port 21886.", "new_connection", ""),
        ("Client <unknown> disconnected, not authorised.", "not_authorised", "<unknown>"),
        ("Client device-1 already connected, closing old connection.", "takeover", "device-1"),
        ("Client device-1 disconnected due to oversize packet.", "oversize", "device-1"),
        ("Client device-1 closed its connection.", "gone", "device-1"),
        ("Client device-1 has exceeded timeout, disconnecting.", "gone", "device-1"),
    ],
)
def test_broker_lines(line, kind, client_id):
    event = rules.parse_log_line(f"1763788800: {line}")
    assert event.kind == kind and event.client_id == client_id


def test_unrelated_lines_and_bad_subscribe_lines_are_ignored():
    assert rules.parse_log_line("1763788800: Saving in-memory database to /tmp/x.db.") is None
    assert rules.parse_log_line("garbage", subscribe=True) is None
    event = rules.parse_log_line("1763788800: device-1 1 $SYS/#", subscribe=True)
    assert (event.client_id, event.topic_filter) == ("device-1", "$SYS/#")


def test_a_refusal_is_attributed_to_the_newest_unmatched_connection():
    attribution = rules.ConnectionAttribution()
    attribution.opened("10.0.0.1", 1000, now=0.0)
    attribution.opened("10.0.0.2", 2000, now=0.1)
    attribution.connected("10.0.0.2", 2000)  # that one logged in
    assert attribution.refused(now=0.2) == "10.0.0.1"
    assert attribution.refused(now=0.3) == ""  # nothing left to blame


def test_failures_escalate_to_brute_force_per_address_and_spraying_across_addresses():
    rule = rules.AuthFailureRule(window=60, threshold=3, spray_addresses=3)
    severities = [rule.failure("10.0.0.1", now=t)[0].severity for t in (0, 1, 2)]
    assert severities == ["low", "low", "high"]
    # Outside the window the count starts again.
    assert rule.failure("10.0.0.1", now=200)[0].evidence["failures_in_window"] == 1
    rule.failure("10.0.0.2", now=201)
    findings = rule.failure("10.0.0.3", now=202)
    assert {f.kind for f in findings} == {"auth_failures", "auth_spraying"}


@pytest.mark.parametrize(
    ("topic_filter", "why"),
    [
        ("rx/device-1/#", ""),
        ("rx/device-1/command", ""),
        ("#", "wildcard"),
        ("+/#", "wildcard"),
        ("rx/+/command", "wildcard"),
        ("$SYS/#", "$SYS or another broker topic"),
        ("rx/device-2/command", "another device's topics"),
        ("tx/device-1/telemetry", "outside its own topics"),
        ("$share/g/rx/device-1/#", "shared subscription"),
    ],
)
def test_subscriptions_outside_the_devices_subtree(topic_filter, why):
    assert rules.subscription_violation("device-1", topic_filter, rx_prefix="rx", rx_channels=RX) == why


def test_fingerprint_change_and_alternation():
    a, b = "p5 c0 k60 10.0.0.0/24", "p5 c1 k30 10.0.0.0/24"
    assert rules.fingerprint_verdict([], a) == ""
    assert rules.fingerprint_verdict([a, a], a) == ""
    assert rules.fingerprint_verdict([a, a], b) == "changed"
    assert rules.fingerprint_verdict([a, b], a) == "changed"  # back once: a firmware rollback looks like this
    assert rules.fingerprint_verdict([a, b, a], b) == "alternating"


def test_firmware_versions_compare_numerically():
    assert rules.version_key("2.10.0") > rules.version_key("2.9.9")
    assert rules.firmware_verdict("1.2.0", latest="1.4.0", minimum="1.3.0") == "below_minimum"
    assert rules.firmware_verdict("1.3.5", latest="1.4.0", minimum="1.3.0") == "outdated"
    assert rules.firmware_verdict("1.4.0", latest="1.4.0", minimum="1.3.0") == ""
    assert rules.firmware_verdict("", latest="1.4.0", minimum="") == ""


T = baseline.Thresholds(
    min_windows=3, rate_factor=5, rate_min_excess=50, rate_absolute=150, size_factor=4, size_min_bytes=2048
)


def test_rate_uses_the_absolute_ceiling_until_the_baseline_is_learned():
    learning = baseline.WindowState(messages=149, bytes=0, rate=1.0, size=200, windows=1)
    assert not baseline.rate_anomaly(learning, T)
    assert baseline.rate_anomaly(baseline.WindowState(151, 0, 1.0, 200, 1), T)
    learned = baseline.WindowState(messages=60, bytes=0, rate=20.0, size=200, windows=5)
    assert not baseline.rate_anomaly(learned, T)  # 20 * 5 = 100 allowed
    assert baseline.rate_anomaly(baseline.WindowState(101, 0, 20.0, 200, 5), T)


def test_size_anomaly_against_the_devices_usual_size():
    state = baseline.WindowState(messages=10, bytes=0, rate=10, size=1000, windows=5)
    assert not baseline.size_anomaly(10, 10 * 3000, state, T)
    assert baseline.size_anomaly(10, 10 * 4100, state, T)
    assert not baseline.size_anomaly(10, 10 * 9000, baseline.WindowState(10, 0, 10, 1000, 1), T)


def test_values_outside_the_learned_range_are_found_and_not_learned():
    learned = {"temperature": (20.0, 22.0, 100)}
    findings, updated = baseline.value_check(learned, {"temperature": (20.5, 21.5, 5)}, min_samples=30, margin=0.5)
    assert findings == [] and updated["temperature"] == (20.0, 22.0, 105)
    findings, updated = baseline.value_check(learned, {"temperature": (0.0, 0.0, 1)}, min_samples=30, margin=0.5)
    assert findings[0]["reading"] == "temperature" and "temperature" not in updated
    # Not enough samples yet: everything is learned.
    findings, updated = baseline.value_check({}, {"battery": (5.0, 90.0, 3)}, min_samples=30, margin=0.5)
    assert findings == [] and updated["battery"] == (5.0, 90.0, 3)


@pytest.mark.parametrize(
    ("message", "ok"),
    [
        ({"v": 1, "type": "telemetry", "id": "a-1", "ts": 1.5, "seq": 3, "values": {"temperature": 20.1}}, True),
        ({"v": 1, "type": "telemetry", "id": "a-1", "ts": 1.5, "seq": 3, "values": {"ok": True, "n": None}}, True),
        ({"v": 2, "type": "telemetry", "id": "a-1", "ts": 1.5, "seq": 3, "values": {}}, False),
        ({"v": 1, "type": "telemetry", "id": "a-1", "ts": 1.5, "seq": -1, "values": {}}, False),
        ({"v": 1, "type": "telemetry", "id": "a-1", "ts": float("nan"), "seq": 1, "values": {}}, False),
        ({"v": 1, "type": "telemetry", "id": "a-1", "ts": 1, "seq": 1, "values": {"x": "hot"}}, False),
        ({"v": 1, "type": "telemetry", "id": "a-1", "ts": 1, "seq": 1, "values": {"Bad": 1}}, False),
        (["v", 1], False),
    ],
)
def test_the_telemetry_fast_path_agrees_with_the_protocol(message, ok):
    assert (check_telemetry(message) == "") is ok
