"""The device library and the simulator against the real Mosquitto, started with the project's rendered policy and
console-issued secrets. Judged by what the console side receives and what the broker refuses."""

import json
import os
import secrets
import signal
import subprocess
import sys

import pytest
from django.conf import settings

from fleetkeeper_device import Backoff, DeviceClient, protocol
from fleetkeeper_device.simulator import DeviceSpec, Simulation
from security import services
from tests.factories import DeviceFactory
from tests.support.broker import ConsoleClients, apply_now
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTLE = 0.5  # how long a message that should not arrive is given to arrive anyway


def issue(operator, device, secret=None):
    return services.credential_issue(actor=operator, device=device, secret=secret).password


@pytest.fixture
def console(mosquitto):
    """The console: the consumer identity reads tx/+/..., the commander identity writes rx/+/... ."""
    client = ConsoleClients(mosquitto.port)
    assert client.connect() == 0
    assert client.subscribe("tx/+/telemetry", "tx/+/status", "tx/+/ack") == [1, 1, 1]
    yield client
    client.close()


def messages_on(console, topic):
    return [protocol.decode(m.payload) for m in list(console.messages) if m.topic == topic]


def test_a_device_with_a_console_issued_secret_publishes_telemetry_the_console_receives(
    mosquitto, operator, console, devices
):
    device_row = DeviceFactory(client_id="device-thermo-1", firmware_version="2.4.1")
    secret = issue(operator, device_row)
    apply_now()

    device = devices("device-thermo-1", secret, firmware_version="2.4.1", model="Thermo-200")
    assert device.wait_connected(5), device.stats
    assert device.publish_telemetry({"temperature": 21.5, "battery": 87, "signal": -67})

    assert console.wait_for(lambda ms: any(m.topic == "tx/device-thermo-1/telemetry" for m in ms), timeout=3)
    (telemetry,) = messages_on(console, "tx/device-thermo-1/telemetry")
    assert telemetry["values"] == {"temperature": 21.5, "battery": 87, "signal": -67}
    assert telemetry["seq"] == 1
    assert console.wait_for(lambda ms: any(m.topic == "tx/device-thermo-1/status" for m in ms), timeout=3)
    status = messages_on(console, "tx/device-thermo-1/status")[0]
    assert (status["firmware"], status["model"]) == ("2.4.1", "Thermo-200")
    assert 0 <= status["uptime"] < 60


def test_a_device_with_a_wrong_secret_never_connects(mosquitto, operator, devices):
    issue(operator, DeviceFactory(client_id="device-wrong-1"))
    apply_now()
    device = devices("device-wrong-1", "not-the-issued-secret-" + "x" * 20)
    assert not device.wait_connected(1.5)
    assert device.stats["refused"] >= 1 and device.stats["connects"] == 0


def test_a_command_delivered_twice_is_executed_and_acked_exactly_once(mosquitto, operator, console, devices):
    secret = issue(operator, DeviceFactory(client_id="device-cmd-1"))
    apply_now()
    runs = []
    device = devices("device-cmd-1", secret, command_handlers={"blink": lambda args: runs.append(args) or {"ok": 1}})
    assert device.wait_connected(5) and wait_until(lambda: device.stats["status"] >= 1, timeout=5.0)
    assert wait_until(lambda: device.stats["subscribed"] >= 1, timeout=5), "the broker never granted rx/<id>/#"

    command = protocol.encode("command", id="cmd-blink-1", name="blink", args={"times": 3})
    console.publish("rx/device-cmd-1/command", command, qos=1)
    console.publish("rx/device-cmd-1/command", command, qos=1)  # the console re-sends: a duplicate
    other = protocol.encode("command", id="cmd-ping-2", name="ping")
    console.publish("rx/device-cmd-1/command", other, qos=1)

    # The device answers in order: once the last command's ack is in, an ack for the duplicate would be too.
    assert console.wait_for(
        lambda ms: any(m.topic == "tx/device-cmd-1/ack" and b"cmd-ping-2" in m.payload for m in ms), timeout=3
    )
    acks = messages_on(console, "tx/device-cmd-1/ack")
    assert sorted(a["id"] for a in acks) == ["cmd-blink-1", "cmd-ping-2"]
    blink = next(a for a in acks if a["id"] == "cmd-blink-1")
    assert (blink["status"], blink["command"], blink["result"]) == ("ok", "command", {"ok": 1})
    assert runs == [{"times": 3}]
    assert device.stats["duplicates"] == 1


def test_a_broken_or_unknown_command_is_answered_rejected_with_the_reason(mosquitto, operator, console, devices):
    secret = issue(operator, DeviceFactory(client_id="device-cmd-2"))
    apply_now()
    device = devices("device-cmd-2", secret)
    assert device.wait_connected(5) and wait_until(lambda: device.stats["status"] >= 1, timeout=5.0)
    assert wait_until(lambda: device.stats["subscribed"] >= 1, timeout=5), "the broker never granted rx/<id>/#"
    console.publish("rx/device-cmd-2/command", protocol.encode("command", id="c-1", name="self_destruct"))
    console.publish("rx/device-cmd-2/command", json.dumps({"v": 1, "type": "command", "id": "c-2", "name": 7}))
    assert console.wait_for(lambda ms: sum(m.topic == "tx/device-cmd-2/ack" for m in ms) >= 2, timeout=3)
    acks = {a["id"]: a for a in messages_on(console, "tx/device-cmd-2/ack")}
    assert acks["c-1"]["status"] == "rejected" and "unknown command 'self_destruct'" in acks["c-1"]["detail"]
    assert acks["c-2"]["status"] == "rejected" and acks["c-2"]["detail"].startswith("name: must be a string")


def test_rotation_handover_falls_back_to_the_previous_secret_until_the_broker_switches(
    mosquitto, operator, console, devices
):
    device_row = DeviceFactory(client_id="device-rot-1")
    old_secret = issue(operator, device_row)
    apply_now()
    device = devices("device-rot-1", old_secret)
    assert device.wait_connected(5) and wait_until(lambda: device.stats["status"] >= 1, timeout=5.0)
    assert wait_until(lambda: device.stats["subscribed"] >= 1, timeout=5), "the broker never granted rx/<id>/#"

    # The console sends a new secret; the device stores it (keeping the old one) and confirms.
    new_secret = secrets.token_urlsafe(32)
    console.publish("rx/device-rot-1/credentials", protocol.encode("credentials", id="rot-1", secret=new_secret), qos=1)
    assert console.wait_for(lambda ms: any(m.topic == "tx/device-rot-1/ack" for m in ms), timeout=3)
    assert messages_on(console, "tx/device-rot-1/ack")[0]["status"] == "ok"
    stored = device.store.load()
    assert (stored.current.secret, stored.previous.secret) == (new_secret, old_secret)

    # The link drops before the broker knows the new secret: the new one is refused, the old one still works.
    device.reactor.call_soon_threadsafe(device.mqtt.disconnect)
    assert wait_until(lambda: device.stats["fallbacks"] == 1 and device.connected, timeout=5), device.stats
    assert device.stats["refused"] == 1
    assert device.store.load().previous.secret == old_secret  # still needed

    # The console switches the broker to the new secret; the reload drops the session that used the old one,
    # the device comes back with the new one and forgets the old.
    connects = device.stats["connects"]
    issue(operator, device_row, secret=new_secret)
    apply_now()
    assert wait_until(lambda: device.stats["connects"] > connects and device.connected, timeout=5), device.stats
    assert wait_until(lambda: device.store.load().previous is None, timeout=5.0)
    assert device.store.load().current.secret == new_secret
    assert device.stats["fallbacks"] == 1


def test_simulated_fleet_with_a_hostile_device_is_contained_by_the_broker(mosquitto, operator, console):
    rows = [DeviceFactory(client_id=f"device-sim-{i}") for i in range(4)]
    specs = [DeviceSpec(row.client_id, issue(operator, row), firmware="1.0.0") for row in rows]
    apply_now()
    specs[0] = DeviceSpec(specs[0].client_id, specs[0].secret, hostile=True)
    honest = [s.client_id for s in specs[1:]]
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

    simulation = Simulation(
        specs,
        host="127.0.0.1",
        port=mosquitto.port,
        rate=4.0,
        duration=6.0,
        max_packet_size=settings.MQTT_MAX_PACKET_SIZE,
        seed=11,
        out=Out(),
        hostile_interval=0.2,
        flood_burst=50,
    )
    result = simulation.run()

    # Honest devices were live the whole time: there was something to leak.
    received = {m.topic.split("/")[1] for m in list(console.messages) if m.topic.endswith("/telemetry")}
    assert set(honest) <= received
    assert result["connected_at_end"] >= 3 and result["max_connected"] == 4
    # One line per second, then the final line.
    assert sum(line.startswith("[") for line in lines) >= 4
    assert "connected" in lines[0] and "refused" in lines[0] and "messages" in lines[0]
    assert lines[-1].startswith("stopped after")

    stats = result["hostile_stats"]
    # Every attack was tried, and every attack that can be refused was refused.
    for attack in ("brute_force", "wildcard_subscribe", "cross_publish", "oversize", "takeover", "replay", "flood"):
        assert stats.get(f"attempts_{attack}", 0) >= 1, (attack, stats)
    for refused in ("brute_force", "cross_publish", "forged_command", "oversize", "replay_on_victim"):
        assert stats.get(f"refused_{refused}", 0) >= 1, (refused, stats)
    assert result["breaches"] == 0, result["breach_log"]
    assert result["leaked"] == 0, result["breach_log"]
    assert result["honest_taken_over"] == 0
    assert result["refused"] >= 5
    # The hostile device's wildcard subscriptions were granted (acl_file never refuses a SUBSCRIBE) and still
    # delivered nothing of the other devices: judged by delivery, not by SUBACK.
    assert stats.get("subscribe_granted", 0) >= 3
    # Its forged telemetry never reached the console under a victim's name.
    for message in list(console.messages):
        if message.topic.endswith("/telemetry") and message.topic.split("/")[1] in honest:
            assert protocol.decode(message.payload)["values"].get("temperature") != 99.9
    assert "disconnected due to oversize packet" in mosquitto.log()


def test_the_plain_cli_runs_from_a_credentials_file_and_stops_cleanly_on_sigterm(
    mosquitto, operator, console, tmp_path
):
    rows = [DeviceFactory(client_id=f"device-cli-{i}") for i in range(2)]
    credentials = [{"client_id": row.client_id, "password": issue(operator, row)} for row in rows]
    apply_now()
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(credentials))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = ROOT
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetkeeper_device.simulator",
            "--port",
            str(mosquitto.port),
            "--credentials",
            str(path),
            "--rate",
            "5",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert console.wait_for(
            lambda ms: {m.topic for m in ms} >= {f"tx/{r.client_id}/telemetry" for r in rows}, timeout=8
        )
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    output = stdout.splitlines()
    assert any(line.startswith("stopped after") for line in output)
    summary = json.loads(output[-1])
    assert summary["devices"] == 2 and summary["max_connected"] == 2 and summary["refused"] == 0
    # A clean stop: each device said goodbye with an MQTT DISCONNECT.
    assert mosquitto.wait_for_log("Client device-cli-0 disconnected.") and mosquitto.wait_for_log(
        "Client device-cli-1 disconnected."
    )


def test_certificate_renewal_firmware_offers_and_config_round_trip_through_the_broker(
    mosquitto, operator, console, devices
):
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fleetkeeper_device.firmware import sign_digest
    from tests.device.test_firmware_and_certificates import sign_csr

    secret = issue(operator, DeviceFactory(client_id="device-full-1", firmware_version="2.0.0"))
    apply_now()
    signing_key = Ed25519PrivateKey.generate()
    offers, configs = [], []
    device = devices(
        "device-full-1",
        secret,
        firmware_version="2.0.0",
        firmware_public_key=signing_key.public_key().public_bytes_raw().hex(),
        firmware_hook=lambda offer: offers.append(offer.version) or True,
        config_handler=lambda config, revision: configs.append((config, revision)),
    )
    assert device.wait_connected(5) and wait_until(lambda: device.stats["status"] >= 1, timeout=5.0)
    assert console.subscribe("tx/+/csr") == [1]
    assert wait_until(lambda: device.stats["subscribed"] >= 1, timeout=5), "the broker never granted rx/<id>/#"

    def acks():
        return {a["id"]: a for a in messages_on(console, "tx/device-full-1/ack")}

    # Certificate renewal: the key is made on the device; only the CSR travels.
    console.publish("rx/device-full-1/credentials", protocol.encode("certificate_renew", id="renew-1"))
    assert console.wait_for(lambda ms: any(m.topic == "tx/device-full-1/csr" for m in ms), timeout=5)
    csr = messages_on(console, "tx/device-full-1/csr")[0]
    assert csr["ref"] == "renew-1" and "PRIVATE KEY" not in json.dumps(csr)
    certificate, pem = sign_csr(csr["csr"])
    console.publish(
        "rx/device-full-1/credentials",
        protocol.encode("certificate", id="cert-1", ref="renew-1", certificate=pem),
    )
    image = b"firmware 2.1.0" * 100
    digest = hashlib.sha256(image).hexdigest()
    offer = {"version": "2.1.0", "url": "https://fw.example.test/2.1.0.bin", "size": len(image), "sha256": digest}
    console.publish(
        "rx/device-full-1/firmware",
        protocol.encode("firmware_offer", id="fw-good", signature=sign_digest(signing_key, digest), **offer),
    )
    forged = sign_digest(Ed25519PrivateKey.generate(), digest)
    console.publish(
        "rx/device-full-1/firmware", protocol.encode("firmware_offer", id="fw-forged", signature=forged, **offer)
    )
    console.publish(
        "rx/device-full-1/config", protocol.encode("config", id="cfg-2", revision=2, config={"interval": 30})
    )
    console.publish(
        "rx/device-full-1/config", protocol.encode("config", id="cfg-1", revision=1, config={"interval": 5})
    )

    expected = {"renew-1", "cert-1", "fw-good", "fw-forged", "cfg-2", "cfg-1"}
    assert console.wait_for(lambda ms: set(acks()) >= expected, timeout=5), acks()
    answered = acks()
    assert answered["renew-1"]["status"] == "ok"
    assert answered["cert-1"]["status"] == "ok"
    assert answered["cert-1"]["result"] == {"serial": format(certificate.serial_number, "x")}
    assert device.store.load().certificate_pem == pem and device.store.load().pending_key_pem is None
    assert answered["fw-good"]["status"] == "ok" and offers == ["2.1.0"]
    assert answered["fw-forged"]["status"] == "rejected" and "does not verify" in answered["fw-forged"]["detail"]
    assert answered["cfg-2"]["status"] == "ok"
    assert (
        answered["cfg-1"]["status"] == "rejected" and "older than the running revision 2" in answered["cfg-1"]["detail"]
    )
    assert configs == [({"interval": 30}, 2)]


def test_a_device_with_a_console_signed_certificate_connects_over_tls_and_publishes(
    mosquitto, operator, console, tmp_path
):
    """The certificate path end to end, as firmware would do it: the device library makes the key and the CSR
    (the key never leaves it), the console signs the CSR, and the library connects to the TLS listener with
    that certificate and no secret; the console receives its telemetry."""
    from fleetkeeper_device import certificates
    from fleetkeeper_device.credentials import CredentialSet, MemoryCredentialStore
    from fleetkeeper_device.tls import TLSOptions
    from security.pki import services as pki

    row = DeviceFactory(client_id="device-tls-1", firmware_version="3.0.0")
    request = certificates.make_key_and_csr("device-tls-1")
    issued = pki.certificate_issue_from_csr(actor=operator, device=row, csr_pem=request.csr_pem)
    apply_now()  # the broker loads the policy (and the CA chain it trusts) with this device in it
    chain_file = tmp_path / "chain.pem"
    chain_file.write_text(pki.ca_chain_pem())

    device = DeviceClient(
        "device-tls-1",
        host="localhost",  # the name in the broker's server certificate
        port=settings.MQTT_TLS_PORT,
        credentials=MemoryCredentialStore(
            CredentialSet(
                certificate_pem=issued.certificate_pem,
                private_key_pem=request.private_key_pem,
                chain_pem=issued.chain_pem,
            )
        ),
        tls=TLSOptions(ca_file=str(chain_file)),
        firmware_version="3.0.0",
        backoff=Backoff(initial=0.2, maximum=1.0),
    )
    device.start()
    try:
        assert device.wait_connected(5), device.stats
        assert device.publish_telemetry({"temperature": 19.0})
        assert console.wait_for(lambda ms: any(m.topic == "tx/device-tls-1/telemetry" for m in ms), timeout=3)
        (telemetry,) = messages_on(console, "tx/device-tls-1/telemetry")
        assert telemetry["values"] == {"temperature": 19.0}
    finally:
        device.stop()
