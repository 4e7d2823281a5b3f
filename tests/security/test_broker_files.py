"""The rendered broker files: pure render functions (unit), atomic writes, and the files loaded by the real broker,
up to 100,000 devices."""

import shutil
import subprocess
import time

import pytest

from devices.models import Device
from security.brokers import broker_config, console_identities, get_adapter
from security.brokers.base import BrokerRejected
from security.brokers.render import DeviceRow, PolicyError, parse_passwd, policy_render, validate, validate_acl
from security.enforcement.secrets import hash_secret, verify_secret
from security.models import DeviceCredential
from security.services import policy_desired
from tests.support.broker import MosquittoServer, raw_connect_code

HASH = hash_secret("x" * 43, iterations=1)


def render(devices=(), **cfg_changes):
    cfg = broker_config()
    if cfg_changes:
        from dataclasses import replace

        cfg = replace(cfg, **cfg_changes)
    return cfg, policy_render(cfg=cfg, devices=[DeviceRow(*d) for d in devices], console=console_identities())


# --- hashes -------------------------------------------------------------------------------------------------


def test_hash_is_mosquittos_pbkdf2_sha512_form():
    stored = hash_secret("s3cret", iterations=7)
    prefix, _, iterations, salt, digest = stored.split("$")
    assert (prefix, iterations) == ("", "7")
    assert verify_secret("s3cret", stored) and not verify_secret("s3cret!", stored)
    assert hash_secret("s3cret", iterations=7) != stored  # a fresh salt every time


def test_verify_accepts_what_mosquitto_passwd_writes(tmp_path):
    """Cross-check with Mosquitto's own tool: the same algorithm, salt size and encoding."""
    path = tmp_path / "passwd"
    path.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(path), "someone", "their-secret"], check=True)
    stored = path.read_text().strip().split(":", 1)[1]
    assert stored.startswith("$7$101$")
    assert verify_secret("their-secret", stored)
    assert parse_passwd(path.read_text()) == {"someone": stored}


# --- the ACL ------------------------------------------------------------------------------------------------


def test_acl_grants_devices_a_finite_set_of_channels_and_nothing_else(db):
    _, policy = render([("device-1", "active", HASH)])
    rules = [line for line in policy.acl.splitlines() if line and not line.startswith("#")]
    patterns = [line for line in rules if line.startswith("pattern")]
    # The one $SYS pattern: the revocation's session watcher, whose username "N" is the only one %u can make match
    # a topic the broker publishes ($SYS/broker/log/N); a device reads $SYS/broker/log/<its id>, which never carries
    # anything (clients cannot publish to $ topics), and no device may be named like a log level (render skips it).
    assert patterns.pop() == "pattern read $SYS/broker/log/%u"
    assert patterns == [
        "pattern write tx/%u/telemetry",
        "pattern write tx/%u/status",
        "pattern write tx/%u/ack",
        "pattern write tx/%u/csr",
        "pattern read rx/%u/command",
        "pattern read rx/%u/config",
        "pattern read rx/%u/credentials",
        "pattern read rx/%u/firmware",
    ]
    assert rules[len(patterns) + 1].startswith("user ")  # no topic line applies to anonymous clients
    assert "#" not in " ".join(patterns) and "$SYS" not in " ".join(patterns) and "$CONTROL" not in "\n".join(rules)
    # Devices have no user block: the file does not grow with the fleet.
    assert "device-1" not in policy.acl
    validate_acl(policy.acl)


def test_console_identities_get_narrow_blocks_outside_the_device_prefix(db, settings):
    _, policy = render()
    blocks = {}
    current = None
    for line in policy.acl.splitlines():
        if line.startswith("user "):
            current = line.split()[1]
            blocks[current] = []
        elif line.startswith("topic ") and current:
            blocks[current].append(line)
    assert set(blocks) == {
        "fleetkeeper-consumer",
        "fleetkeeper-monitor",
        "fleetkeeper-probe",
        "fleetkeeper-commander",
    }
    # The revocation's session watcher ("N"): no user block, a pattern that only its username matches.
    assert "pattern read $SYS/broker/log/%u" in policy.acl.splitlines() and "user N" not in policy.acl
    assert not any(name.startswith(settings.FLEET_CLIENT_ID_PREFIX) for name in blocks)
    assert blocks["fleetkeeper-monitor"] == ["topic read $SYS/broker/#"]
    assert blocks["fleetkeeper-probe"] == ["topic write rx/fleetkeeper-probe/command"]
    assert all(" tx/+/" in t or " rx/+/" in t for t in blocks["fleetkeeper-consumer"])
    assert not any(
        t.startswith("topic read rx") or t.startswith("topic write tx") for t in blocks["fleetkeeper-consumer"]
    )


def test_quarantined_device_gets_deny_lines_for_exactly_the_channels_it_loses(db):
    _, policy = render([("device-q", "quarantined", HASH), ("device-a", "active", HASH)])
    block = policy.acl.split("user device-q\n", 1)[1].splitlines()
    assert block == [
        "topic deny tx/device-q/telemetry",
        "topic deny tx/device-q/status",
        "topic deny tx/device-q/csr",
        "topic deny rx/device-q/command",
        "topic deny rx/device-q/config",
    ]
    assert "user device-a" not in policy.acl
    assert policy.quarantined == ("device-q",)


def test_revoked_decommissioned_and_secretless_devices_are_absent_from_the_password_file(db):
    _, policy = render(
        [
            ("device-ok", "active", HASH),
            ("device-q", "quarantined", HASH),
            ("device-r", "revoked", HASH),
            ("device-d", "decommissioned", HASH),
            ("device-n", "active", ""),
        ]
    )
    users = parse_passwd(policy.passwd)
    assert {"device-ok", "device-q"} <= set(users)
    assert not {"device-r", "device-d", "device-n"} & set(users)
    assert policy.device_usernames == ("device-ok", "device-q")


def test_a_device_named_like_a_console_identity_is_never_rendered(db):
    _, policy = render([("fleetkeeper-consumer", "active", HASH), ("bad:name", "active", HASH)])
    assert set(policy.skipped) == {"fleetkeeper-consumer", "bad:name"}
    assert parse_passwd(policy.passwd)["fleetkeeper-consumer"] != HASH


def test_digest_is_stable_and_the_probe_password_follows_the_generation(db):
    _, one = render([("device-1", "active", HASH)])
    _, again = render([("device-1", "active", HASH)])
    _, other = render([("device-1", "quarantined", HASH)])
    assert one.digest == again.digest and one.passwd == again.passwd
    assert other.digest != one.digest and other.probe_password != one.probe_password


def test_the_probe_password_of_the_loaded_generation_is_read_from_the_files_on_disk(db, settings, mqtt_test_settings):
    """What the posture audit logs in with: the generation the broker loaded, not the one the database wants now."""
    adapter = get_adapter()
    assert adapter.loaded_probe_password(settings.MQTT_PROBE_PASSWORD) == ""  # nothing written yet
    written = policy_desired()
    adapter.write(written)
    Device.objects.create(client_id="device-later")  # the desired policy moves on; the files on disk do not
    assert adapter.loaded_probe_password(settings.MQTT_PROBE_PASSWORD) == written.probe_password
    passwd = mqtt_test_settings["dir"] / "passwd"
    passwd.write_text(passwd.read_text() + "hand-added:line\n")  # not the console's rendering any more
    assert adapter.loaded_probe_password(settings.MQTT_PROBE_PASSWORD) == ""


def test_config_sets_the_limits_and_the_identity_binding(db, settings):
    settings.MQTT_MAX_PACKET_SIZE = 12345
    cfg, policy = render()
    lines = set(policy.config.splitlines())
    for line in (
        "allow_anonymous false",
        "allow_zero_length_clientid false",
        "use_username_as_clientid true",
        "max_packet_size 12345",
        f"max_queued_messages {settings.MQTT_MAX_QUEUED_MESSAGES}",
        f"max_keepalive {settings.MQTT_MAX_KEEPALIVE}",
        "log_dest topic",
        f"listener {settings.MQTT_PORT} {settings.MQTT_HOST}",
        f"pid_file {cfg.pid_file}",
        f"password_file {cfg.password_file}",
        f"acl_file {cfg.acl_file}",
    ):
        assert line in lines, line
    assert f"MQTT_TLS_PORT = {settings.MQTT_TLS_PORT}" in policy.config
    validate(policy, cfg)


@pytest.mark.parametrize(
    "acl",
    [
        "",
        "# only comments\n",
        "topic read #\nuser x\n",
        "pattern read #\n",
        "pattern write tx/%u/#\n",
        "pattern read $SYS/%u\n",
        "pattern write tx/%u/telemetry\ntopic read #\n",
        "pattern write tx/%u/telemetry\nuser x\ntopic readwrite\n",
    ],
)
def test_acl_validation_refuses_empty_open_or_malformed_files(acl):
    with pytest.raises(PolicyError):
        validate_acl(acl)


def test_password_file_validation_refuses_malformed_lines():
    for text in ("nocolon\n", "a:$7$1$short$short\n", "a:plaintext\n", f"a:{HASH}\na:{HASH}\n", f"#bad:{HASH}x\n"):
        if text.startswith("#"):
            continue
        with pytest.raises(PolicyError):
            parse_passwd(text)


# --- atomic writes ------------------------------------------------------------------------------------------


def test_invalid_content_never_replaces_the_installed_file(db, tmp_path, settings):
    settings.MQTT_BROKER_DIR = tmp_path
    adapter = get_adapter()
    good = policy_desired()
    assert adapter.write(good) is True
    assert adapter.write(good) is False  # unchanged: nothing rewritten, no reload needed
    before = (tmp_path / "acl").read_text()
    from dataclasses import replace

    with pytest.raises(BrokerRejected):
        adapter.write(replace(good, acl=""))
    assert (tmp_path / "acl").read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert oct((tmp_path / "passwd").stat().st_mode & 0o777) == "0o640"


# --- in the real broker ---------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db
def test_rendered_files_load_in_the_real_broker(mosquitto, settings):
    """The console identities render and work: the consumer and the monitor log in; a made-up one does not."""
    port = mosquitto.port
    assert (
        raw_connect_code(
            port, client_id="c", username=settings.MQTT_CONSUMER_USERNAME, password=settings.MQTT_CONSUMER_PASSWORD
        )
        == 0
    )
    assert (
        raw_connect_code(
            port, client_id="m", username=settings.MQTT_MONITOR_USERNAME, password=settings.MQTT_MONITOR_PASSWORD
        )
        == 0
    )
    assert (
        raw_connect_code(
            port, client_id="p", username=settings.MQTT_PROBE_USERNAME, password=settings.MQTT_PROBE_PASSWORD
        )
        != 0
    )  # the probe's password is per generation
    assert "Error" not in mosquitto.log()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("count", "bound"),
    [
        # make test: large enough to catch a slow render or load; the last line still authenticates.
        pytest.param(10_000, 5, id="10000-devices"),
        # make soak: the design's fleet size (the benchmark holds its 5 s target on a quiet machine).
        pytest.param(100_000, 15, id="100000-devices", marks=pytest.mark.soak),
    ],
)
def test_rendered_files_load_in_the_real_broker_at_fleet_scale(mqtt_test_settings, settings, count, bound):
    stored = hash_secret("shared-secret-for-load-test-" + "k" * 16, iterations=settings.MQTT_PASSWORD_ITERATIONS)
    Device.objects.bulk_create(
        [
            Device(client_id=f"device-{n:06d}", status="quarantined" if n % 1000 == 0 else "active")
            for n in range(count)
        ],
        batch_size=5000,
    )
    ids = dict(Device.objects.values_list("client_id", "pk"))
    last = f"device-{count - 1:06d}"
    known = hash_secret("the-last-devices-secret-" + "z" * 20, iterations=settings.MQTT_PASSWORD_ITERATIONS)
    DeviceCredential.objects.bulk_create(
        [
            DeviceCredential(
                device_id=pk,
                password_hash=known if client_id == last else stored,
                issued_at="2026-01-01T00:00Z",
            )
            for client_id, pk in ids.items()
        ],
        batch_size=5000,
    )
    started = time.monotonic()
    policy = policy_desired()
    get_adapter().write(policy)
    rendered = time.monotonic() - started
    assert len(policy.device_usernames) == count and len(policy.quarantined) == count // 1000
    server = MosquittoServer(mqtt_test_settings["dir"], mqtt_test_settings["port"]).start(timeout=30)
    try:
        code = raw_connect_code(
            server.port, client_id="x", username=last, password="the-last-devices-secret-" + "z" * 20
        )
        loaded = time.monotonic() - started  # the last line of the file authenticates: it has been loaded
        assert code == 0, server.log()[-2000:]
        assert raw_connect_code(server.port, client_id="x", username=last, password="wrong") != 0
        print(f"{count:,} devices: rendered and written in {rendered:.2f} s, listening after {loaded:.2f} s")
        assert loaded < bound  # the benchmark holds the targets; this bound only catches a gross regression
    finally:
        server.stop()
        for child in mqtt_test_settings["dir"].iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# --- the topic scheme -------------------------------------------------------------------------------------------


def test_topic_helpers_follow_the_configured_prefixes(settings):
    from security import topics

    settings.MQTT_TOPIC_RX_PREFIX, settings.MQTT_TOPIC_TX_PREFIX = "down", "up"
    assert topics.rx_topic("device-1", "command") == "down/device-1/command"
    assert topics.tx_topic("device-1", "telemetry") == "up/device-1/telemetry"
    assert topics.device_rx_filter("device-1") == "down/device-1/#"
    assert topics.fleet_tx_filter("status", shared_group="fk") == "$share/fk/up/+/status"
    assert topics.parse_tx_topic("up/device-1/ack") == ("device-1", "ack")
    for bad in ("up/device-1/other", "down/device-1/command", "up/device-1/ack/x", "up//ack"):
        assert topics.parse_tx_topic(bad) is None
    with pytest.raises(ValueError):
        topics.tx_topic("device-1", "secrets")
    assert set(topics.QUARANTINE_DENIED_TX) | set(topics.REPAIR_TX_CHANNELS) == set(topics.TX_CHANNELS)
    assert set(topics.QUARANTINE_DENIED_RX) | set(topics.REPAIR_RX_CHANNELS) == set(topics.RX_CHANNELS)


def test_rendered_acl_follows_the_configured_prefixes(db, settings):
    settings.MQTT_TOPIC_RX_PREFIX, settings.MQTT_TOPIC_TX_PREFIX = "down", "up"
    _, policy = render([("device-q", "quarantined", HASH)])
    assert "pattern write up/%u/telemetry" in policy.acl and "pattern read down/%u/command" in policy.acl
    assert "topic deny up/device-q/telemetry" in policy.acl and " tx/" not in policy.acl
