"""A real Mosquitto for tests, started with the configuration the project renders, on a free port; and a small
synchronous MQTT client (paho-mqtt 2) for asserting what the broker delivers and refuses."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from fleet.ports import wait_for_port

from .servers import stop as stop_process


class MosquittoServer:
    """Runs ``mosquitto -c <broker_dir>/mosquitto.conf`` in the foreground and writes its pid file (Mosquitto
    writes one only when daemonised), so the adapter can signal it exactly as in production."""

    def __init__(self, broker_dir: Path | str, port: int):
        self.dir = Path(broker_dir)
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "mosquitto.log"
        self._log = None

    @property
    def config_path(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def pid_path(self) -> Path:
        return self.dir / "mosquitto.pid"

    def start(self, timeout: float = 10.0) -> MosquittoServer:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed: run `make test`, which installs it")
        if not self.config_path.exists():
            raise RuntimeError(f"render the broker config into {self.dir} first")
        self._log = self.log_path.open("a")
        # Mosquitto's stdout is block-buffered into a file; stdbuf (coreutils) makes it line-buffered so a test
        # can read the log as it happens. stdbuf execs Mosquitto: the pid stays the broker's.
        line_buffered = [shutil.which("stdbuf"), "-oL"] if shutil.which("stdbuf") else []
        self.proc = subprocess.Popen(
            [*line_buffered, binary, "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        self.pid_path.write_text(f"{self.proc.pid}\n")
        wait_for_port(self.port, timeout=timeout, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> MosquittoServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, *, timeout: float = 5.0, after: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log()[after:]:
                return True
            time.sleep(0.02)
        return False


class MqttClient:
    """A paho-mqtt 2 client driven by its own network thread, with bounded waits. MQTT v5 by default, so refusals
    and disconnects come with reason codes."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        protocol=mqtt.MQTTv5,
        host: str = "127.0.0.1",
        tls: TlsFiles | None = None,
    ):
        self.port, self.host = port, host
        # No automatic reconnect: a client the broker dropped (a kick, a takeover, a denied publish) stays dropped
        # until its test connects again. paho's loop would otherwise reconnect it a second later with the same
        # client id and take over whatever session the test opened meanwhile with that id.
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, reconnect_on_failure=False
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls.context())
        self.messages: list[mqtt.MQTTMessage] = []
        self.connect_reason: int | None = None
        self.disconnect_reason: int | None = None
        self.suback: list[int] = []
        self.puback: dict[int, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # callbacks (network thread)
    def _on_connect(self, _c, _u, _flags, reason, _props):
        self.connect_reason = reason.value
        (self._connected if reason.value == 0 else self._disconnected).set()

    def _on_disconnect(self, _c, _u, _flags, reason, _props):
        self.disconnect_reason = reason.value if hasattr(reason, "value") else int(reason)
        self._disconnected.set()

    def _on_message(self, _c, _u, message):
        with self._lock:
            self.messages.append(message)

    def _on_subscribe(self, _c, _u, _mid, reason_codes, _props):
        self.suback = [rc.value for rc in reason_codes]

    def _on_publish(self, _c, _u, mid, reason, _props):
        self.puback[mid] = reason.value

    # actions
    def connect_outcome(self, timeout: float = 5.0) -> str:
        """For TLS refusals, which come as a failed handshake, a TLS alert or a closed socket instead of a CONNACK:
        "connected", or "refused: <why>"."""
        try:
            code = self.connect(timeout=timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            return f"refused: {type(exc).__name__}: {exc}"
        if code != 0:
            return f"refused: CONNACK {code}"
        # With TLS 1.3 the client finishes its handshake before the server has checked the client certificate: a
        # refusal then arrives as an alert right after. Give it a moment to arrive before calling it connected.
        if self._disconnected.wait(0.2):
            return f"refused: disconnected ({self.disconnect_reason})"
        return "connected"

    def connect(self, timeout: float = 5.0) -> int:
        """The CONNACK reason code (0 = accepted); raises if the broker sends nothing."""
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while self.connect_reason is None and not self._disconnected.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.connect_reason is None:
            raise TimeoutError("no CONNACK from the broker")
        return self.connect_reason

    def subscribe(self, *filters: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        self.suback = []
        self.client.subscribe([(f, qos) for f in filters])
        deadline = time.monotonic() + timeout
        while not self.suback and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.suback

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 5.0):
        info = self.client.publish(topic, payload, qos=qos)
        if qos:
            info.wait_for_publish(timeout=timeout)
        return info

    def wait_for(self, predicate, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(list(self.messages)):
                    return True
            time.sleep(0.005)
        with self._lock:
            return bool(predicate(list(self.messages)))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages]

    def topics(self) -> list[str]:
        with self._lock:
            return [m.topic for m in self.messages]

    def wait_disconnected(self, timeout: float = 3.0) -> bool:
        return self._disconnected.wait(timeout)

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected() and not self._disconnected.is_set()

    def close(self) -> None:
        try:
            if self.client.is_connected():
                self.client.disconnect()
        finally:
            self.client.loop_stop()


class ConsoleClients:
    """The console as tests need it: the consumer identity reads devices' tx channels, the commander identity (the
    only console identity allowed to write rx/+/...) sends to devices. Reads go to the consumer, publishes to the
    commander, so a test exercises the same least-privilege split as production."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", protocol=mqtt.MQTTv5):
        from django.conf import settings

        self.reader = MqttClient(
            port,
            host=host,
            protocol=protocol,
            client_id=settings.MQTT_CONSUMER_USERNAME,
            username=settings.MQTT_CONSUMER_USERNAME,
            password=settings.MQTT_CONSUMER_PASSWORD,
        )
        self.sender = MqttClient(
            port,
            host=host,
            protocol=protocol,
            client_id=settings.MQTT_COMMANDER_USERNAME,
            username=settings.MQTT_COMMANDER_USERNAME,
            password=settings.MQTT_COMMANDER_PASSWORD,
        )

    def connect(self, timeout: float = 5.0) -> int:
        return self.reader.connect(timeout) or self.sender.connect(timeout)

    def subscribe(self, *filters: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        return self.reader.subscribe(*filters, qos=qos, timeout=timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 5.0):
        return self.sender.publish(topic, payload, qos=qos, timeout=timeout)

    def wait_for(self, predicate, timeout: float = 3.0) -> bool:
        return self.reader.wait_for(predicate, timeout)

    def payloads(self) -> list[bytes]:
        return self.reader.payloads()

    def topics(self) -> list[str]:
        return self.reader.topics()

    @property
    def messages(self):
        return self.reader.messages

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sender.close()


class TlsFiles:
    """A client certificate, its key and the CA chain to trust, as an SSL context for paho (TLS 1.2 or newer)."""

    def __init__(self, *, ca_chain: str, cert: str | None = None, key: str | None = None, directory: Path | str):
        import os
        import uuid

        self.ca_chain = ca_chain
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = uuid.uuid4().hex[:8]
        self.cert_path = self.key_path = None
        if cert is not None and key is not None:
            self.cert_path = self.dir / f"{stem}.crt"
            self.key_path = self.dir / f"{stem}.key"
            self.cert_path.write_text(cert)
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key)

    def context(self):
        import ssl

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_chain)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_path is not None:
            context.load_cert_chain(self.cert_path, self.key_path)
        return context


def raw_connect_code(
    port: int, *, client_id: str, username: str | None, password: str | None, protocol=mqtt.MQTTv5, timeout: float = 5.0
) -> int:
    """Connect, report the CONNACK reason code, disconnect."""
    client = MqttClient(port, client_id=client_id, username=username, password=password, protocol=protocol)
    try:
        return client.connect(timeout=timeout)
    finally:
        client.close()


def apply_now():
    """What the worker's apply task does with the pending changes, run here (Mosquitto: render, write, SIGHUP; a hook
    broker: invalidate, kick), then the canary probe, which must pass."""
    from security import services

    result = services.enforcement_apply(coalesce=False)
    assert result is not None and result.probe is not None
    assert result.probe.ok, result.probe
    return result
