"""DeviceClient: the device half of the Fleetkeeper protocol over one MQTT connection.

What it does for the device application:
- connects with its client id as MQTT client id and username and the console-issued secret as
  password (TLS pluggable, see tls.py), and reconnects with exponential backoff and jitter;
- during a rotation keeps the new and the previous secret, and falls back to the previous one when
  the broker refuses the new one;
- subscribes to ``rx/<id>/#`` only, and publishes on the fixed ``tx/<id>/...`` channels;
- answers every console message exactly once on ``tx/<id>/ack``, de-duplicating redeliveries;
- handles rotation, certificate renewal, firmware offers (signature checked first) and config.

Many DeviceClients can share one ``Reactor`` (one thread for thousands of devices); a client built
without one makes its own and runs it in a background thread. Public methods may be called from any
thread; the work is handed to the reactor's thread.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import protocol, sealing, topics
from .backoff import Backoff
from .certificates import CertificateRejected, check_certificate, make_key_and_csr
from .credentials import Credential, CredentialSet, CredentialStore, MemoryCredentialStore
from .dedup import Deduplicator
from .firmware import FirmwareHook, FirmwareOffer, FirmwareRejected, is_downgrade, load_public_key, verify_offer
from .reactor import Reactor, Timer
from .tls import TLSContextFactory

log = logging.getLogger(__name__)

# CONNACK reason codes that mean "these credentials are not accepted" (MQTT 5 values; paho maps the
# 3.1.1 return codes 4 and 5 onto 134 and 135).
AUTH_REFUSED_CODES = frozenset({134, 135, 140})
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another connection used this client id
MQTT_VERSIONS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class CommandRejected(Exception):
    """Raised by a handler that will not do what was asked; the text becomes the ack's ``detail``."""


# MQTT 5 Session Expiry Interval the library asks for: 0xFFFFFFFF, "the session does not expire" (what MQTT 3.1.1's
# clean_session=false means too). Not a finite interval on purpose: Mosquitto 2.0.11 (Debian 12's broker) corrupts
# its session-expiry list when a reload re-authenticates an offline MQTT 5 session that has a finite expiry and whose
# credential changed (a rotation or revocation while the device is away) and later crashes (docs/broker.md,
# "Known broker bug"). Sessions that never expire are not on that list. The console ends the sessions of revoked
# devices itself (docs/revocation.md, session purge).
SESSION_NEVER_EXPIRES = 0xFFFFFFFF


class DeviceEvents:
    """Hooks for observing a device (the simulator counts with them). Every method is optional."""

    def connected(self, device: DeviceClient, slot: str) -> None: ...

    def refused(self, device: DeviceClient, reason: str, slot: str) -> None: ...

    def connect_failed(self, device: DeviceClient, error: Exception) -> None: ...

    def disconnected(self, device: DeviceClient, reason_code: int, reason: str) -> None: ...

    def unexpected_message(self, device: DeviceClient, topic: str, payload: bytes) -> None: ...

    def acked(self, device: DeviceClient, message_id: str, command: str, status: str) -> None: ...

    def duplicate(self, device: DeviceClient, message_id: str) -> None: ...

    def published(self, device: DeviceClient, mid: int, reason_code: int) -> None: ...

    def subscribed(self, device: DeviceClient, mid: int, reason_codes: list[int]) -> None: ...


CommandHandler = Callable[[dict], Mapping[str, Any] | None]
ConfigHandler = Callable[[dict, int | None], Mapping[str, Any] | None]


class DeviceClient:
    def __init__(
        self,
        client_id: str,
        *,
        host: str,
        port: int = 1883,
        credentials: CredentialStore | None = None,
        secret: str | None = None,
        firmware_version: str = "0.0.0",
        model: str | None = None,
        topic_scheme: topics.TopicScheme = topics.DEFAULT_SCHEME,
        tls: TLSContextFactory | None = None,
        mqtt_version: str = "5",
        keepalive: int = 60,
        connect_timeout: float = 5.0,
        session_expiry: int = SESSION_NEVER_EXPIRES,
        backoff: Backoff | None = None,
        stable_after: float = 30.0,
        reactor: Reactor | None = None,
        dedup: Deduplicator | None = None,
        firmware_public_key: bytes | str | None = None,
        firmware_hook: FirmwareHook | None = None,
        allow_downgrade: bool = False,
        config_handler: ConfigHandler | None = None,
        command_handlers: Mapping[str, CommandHandler] | None = None,
        events: DeviceEvents | None = None,
        telemetry_qos: int = 0,
        boot_time: float | None = None,
        payload_key: bytes | str | None = None,
        payload_counters: sealing.CounterStore | None = None,
        refuse_clear_messages: bool = False,
    ):
        if credentials is None:
            credentials = MemoryCredentialStore(secret=secret)
        elif secret is not None:
            raise ValueError("give either a credential store or a secret, not both")
        if mqtt_version not in MQTT_VERSIONS:
            raise ValueError(f"mqtt_version must be one of {', '.join(MQTT_VERSIONS)}")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.store = credentials
        self.firmware_version = firmware_version
        self.model = model
        self.topics = topic_scheme
        self.tls = tls
        self.mqtt_version = mqtt_version
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.session_expiry = session_expiry
        self.backoff = backoff or Backoff()
        self.stable_after = stable_after
        self.dedup = dedup or Deduplicator()
        self.firmware_public_key = load_public_key(firmware_public_key) if firmware_public_key else None
        self.firmware_hook = firmware_hook
        self.allow_downgrade = allow_downgrade
        self.config_handler = config_handler
        self.command_handlers: dict[str, CommandHandler] = dict(command_handlers or {})
        self.events = events or DeviceEvents()
        self.telemetry_qos = telemetry_qos
        self.boot_time = boot_time if boot_time is not None else time.time()
        self.stats: Counter[str] = Counter()
        self.config_revision: int | None = None
        self.certificate_serial: str | None = None

        # Topics, built once (hot path).
        self.telemetry_topic = topic_scheme.telemetry(client_id)
        self.status_topic = topic_scheme.status(client_id)
        self.ack_topic = topic_scheme.ack(client_id)
        self.csr_topic = topic_scheme.csr(client_id)
        self.rx_filter = topic_scheme.rx_filter(client_id)

        self._own_reactor = reactor is None
        self.reactor = reactor or Reactor()
        self._mqtt: mqtt.Client | None = None
        self._rebuild_client = False
        self._slot = "current"  # which secret the next attempt uses: "current" or "previous"
        self._attempt_credential: Credential | None = None
        self._session_credential: Credential | None = None  # the secret the live session logged in with
        # The newest secret when the broker refused it and the live session logged in with the previous one.
        self._session_refused: Credential | None = None
        self._refusal: int | None = None
        self._reconnect_timer: Timer | None = None
        self._stable_timer: Timer | None = None
        self._started = False
        self._stopping = False
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._seq = 0
        self._boot_tag = secrets.token_hex(4)
        self._message_counter = 0
        self.last_telemetry: bytes | None = None
        # Payload encryption (sealing.py): with a key, everything published on tx/<id>/... is sealed, and sealed
        # console messages are opened. The counter store must outlive a reboot (FileCounterStore on a device).
        self.sealer = (
            sealing.DeviceSealer(payload_key, client_id, counters=payload_counters) if payload_key is not None else None
        )
        self.refuse_clear_messages = refuse_clear_messages

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def mqtt(self) -> mqtt.Client | None:
        """The underlying paho client (for tools that need raw MQTT; use on the reactor's thread)."""
        return self._mqtt

    def start(self) -> None:
        """Begin connecting. With a private reactor, also start its thread."""
        if self._started:
            return
        self._started = True
        self._stopping = False
        self._stopped.clear()
        if self._own_reactor:
            self.reactor.start_thread(name=f"device-{self.client_id}")
        self._in_loop(self._connect)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (sends MQTT DISCONNECT) and stop reconnecting."""
        self._in_loop(self._begin_stop)
        if self._own_reactor:
            self._stopped.wait(timeout)
            self.reactor.stop()
            self.reactor.join(timeout)
            self.reactor.close()

    def _begin_stop(self) -> None:
        self._stopping = True
        self._started = False
        for timer in (self._reconnect_timer, self._stable_timer):
            if timer is not None:
                timer.cancel()
        client = self._mqtt
        if client is not None and client.socket() is not None:
            client.disconnect()
        else:
            self._stopped.set()

    def _in_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        if self.reactor.in_loop_thread():
            callback(*args)
        else:
            self.reactor.call_soon_threadsafe(callback, *args)

    # ------------------------------------------------------------------ connecting
    def _build_client(self, credentials: CredentialSet) -> mqtt.Client:
        version = MQTT_VERSIONS[self.mqtt_version]
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            clean_session=False if version == mqtt.MQTTv311 else None,
        )
        client.connect_timeout = self.connect_timeout
        # Queued QoS 1 acks survive a reconnect inside paho; keep them bounded.
        client.max_queued_messages_set(1000)
        if self.tls is not None:
            client.tls_set_context(self.tls(credentials))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # paho builds two objects per QoS 0 publish just to call on_publish: only ask when someone listens.
        if type(self.events).published is not DeviceEvents.published:
            client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.reactor.attach(client)
        properties = None
        if version == mqtt.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry
            client.connect_async(self.host, self.port, self.keepalive, clean_start=False, properties=properties)
        else:
            client.connect_async(self.host, self.port, self.keepalive)
        return client

    def _connect(self) -> None:
        self._reconnect_timer = None
        if self._stopping:
            return
        credentials = self.store.load()
        credential = credentials.previous if self._slot == "previous" else credentials.current
        if credential is None and self._slot == "previous":
            self._slot, credential = "current", credentials.current
        if credential is None and credentials.certificate_pem is None:
            log.error("%s has no credential to connect with; waiting", self.client_id)
            self._schedule_reconnect(self.backoff.next())
            return
        if self._mqtt is None or self._rebuild_client:
            if self._mqtt is not None:
                self.reactor.detach(self._mqtt)
            self._mqtt = self._build_client(credentials)
            self._rebuild_client = False
        if credential is not None:
            self._mqtt.username_pw_set(self.client_id, credential.secret)
        else:
            self._mqtt.username_pw_set(self.client_id, None)
        self._attempt_credential = credential
        self._refusal = None
        self.stats["connect_attempts"] += 1
        try:
            self._mqtt.reconnect()
        except (OSError, ValueError) as exc:
            self.stats["connect_errors"] += 1
            self.events.connect_failed(self, exc)
            self._schedule_reconnect(self.backoff.next())

    def _schedule_reconnect(self, delay: float) -> None:
        if self._stopping:
            return
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
        self._reconnect_timer = self.reactor.call_later(delay, self._connect)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if client is not self._mqtt:
            return
        if reason_code.is_failure:
            self._refusal = reason_code.value
            self.stats["refused"] += 1
            self.events.refused(self, str(reason_code), self._slot)
            # The broker closes the connection after a refusing CONNACK; _on_disconnect goes on from there.
            return
        self.stats["connects"] += 1
        self._session_credential = self._attempt_credential
        credentials = self.store.load()
        self._session_refused = credentials.current if self._slot == "previous" else None
        if self._slot == "current" and credentials.previous is not None:
            # The broker took the new secret: the rotation is complete on this side.
            self.store.save(credentials.confirmed())
        self._connected.set()
        client.subscribe(self.rx_filter, qos=1)
        self.events.connected(self, self._slot)
        self._slot = "current"
        self.publish_status()
        self._stable_timer = self.reactor.call_later(self.stable_after, self.backoff.reset)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if client is not self._mqtt:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stable_timer is not None:
            self._stable_timer.cancel()
            self._stable_timer = None
        code = getattr(reason_code, "value", reason_code)
        if code == SESSION_TAKEN_OVER:
            self.stats["taken_over"] += 1
        if was_connected:
            self.stats["disconnects"] += 1
            self.events.disconnected(self, int(code or 0), str(reason_code))
        if self._stopping:
            self._stopped.set()
            return
        refusal, self._refusal = self._refusal, None
        if refusal in AUTH_REFUSED_CODES and self._slot == "current" and self.store.load().previous is not None:
            # Rotation handover: the new secret is not (yet) valid on the broker; the previous may be.
            self._slot = "previous"
            self.stats["fallbacks"] += 1
            self._schedule_reconnect(0.05)
            return
        self._slot = "current"
        self._schedule_reconnect(self.backoff.next())

    # ------------------------------------------------------------------ publishing
    def _next_id(self) -> str:
        self._message_counter += 1
        return f"{self._boot_tag}-{self._message_counter}"

    def publish_telemetry(self, values: Mapping[str, Any], *, qos: int | None = None) -> bool:
        """Send one telemetry message; False (and counted as dropped) when not connected."""
        if not self.reactor.in_loop_thread():
            self.reactor.call_soon_threadsafe(lambda: self.publish_telemetry(dict(values), qos=qos))
            return True
        if self._mqtt is None or not self._connected.is_set():
            self.stats["dropped"] += 1
            return False
        self._seq += 1
        payload = protocol.encode_telemetry(message_id=self._next_id(), ts=time.time(), seq=self._seq, values=values)
        if self.sealer is not None:
            payload = self.sealer.seal(self.telemetry_topic, payload)
        self._mqtt.publish(self.telemetry_topic, payload, qos=self.telemetry_qos if qos is None else qos)
        self.last_telemetry = payload
        self.stats["telemetry"] += 1
        return True

    def publish_status(self) -> None:
        if not self.reactor.in_loop_thread():
            self.reactor.call_soon_threadsafe(self.publish_status)
            return
        if self._mqtt is None:
            return
        now = time.time()
        payload = protocol.encode(
            "status",
            id=self._next_id(),
            ts=now,
            firmware=self.firmware_version,
            boot_time=self.boot_time,
            uptime=round(max(0.0, now - self.boot_time), 3),
            model=self.model,
            certificate_serial=self.certificate_serial,
            **self._credential_report(),
        )
        self._mqtt.publish(self.status_topic, self._sealed(self.status_topic, payload), qos=1)
        self.stats["status"] += 1

    def _credential_report(self) -> dict:
        """Which secret this session logged in with, and whether it is a fallback (the status message's
        ``credential_id`` / ``fallback`` / ``refused_credential_id``): how the console learns that a rotated secret was
        refused while the device is still reachable on its previous one."""
        report: dict = {}
        session = self._session_credential
        if session is not None and session.credential_id:
            report["credential_id"] = session.credential_id
        refused = self._session_refused
        if refused is not None:
            report["fallback"] = True
            if refused.credential_id:
                report["refused_credential_id"] = refused.credential_id
        return report

    def _ack(self, message_id: str, command: str, status: str, detail: str | None = None, result=None) -> None:
        payload = protocol.encode(
            "ack",
            id=message_id,
            ts=time.time(),
            command=command if protocol.is_name(command) else "unknown",
            status=status,
            detail=detail[:500] if detail else None,
            result=dict(result) if result else None,
        )
        # QoS 1 on the same paho client: queued through a reconnect, so an ack is not lost with the link.
        self._mqtt.publish(self.ack_topic, self._sealed(self.ack_topic, payload), qos=1)
        self.stats["acks"] += 1
        self.stats[f"acks_{status}"] += 1
        self.events.acked(self, message_id, command, status)

    def _sealed(self, topic: str, payload: bytes) -> bytes:
        return payload if self.sealer is None else self.sealer.seal(topic, payload)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.events.published(self, mid, getattr(reason_code, "value", 0))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        codes = [getattr(rc, "value", rc) for rc in reason_codes]
        # The broker has granted rx/<id>/# (SUBACK below 0x80): from now on the console's messages reach the device.
        self.stats["subscribed" if all(code < 0x80 for code in codes) else "subscribe_refused"] += 1
        self.events.subscribed(self, mid, codes)

    # ------------------------------------------------------------------ receiving
    def _on_message(self, client, userdata, message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None or parsed.direction != "rx" or parsed.client_id != self.client_id:
            self.stats["unexpected"] += 1
            self.events.unexpected_message(self, message.topic, message.payload)
            return
        payload = message.payload
        if sealing.is_sealed(payload):
            if self.sealer is None:
                self.stats["sealed_rejected"] += 1
                log.warning(
                    "%s: sealed message on %s but this device has no payload key", self.client_id, message.topic
                )
                return
            try:
                payload = self.sealer.open(message.topic, payload)
            except sealing.SealingError as exc:
                # Not answered: nothing in an unauthenticated message (its id included) can be trusted.
                self.stats["sealed_rejected"] += 1
                self.stats[f"sealed_{exc.code}"] += 1
                log.warning("%s: sealed message on %s refused: %s", self.client_id, message.topic, exc)
                return
        elif self.refuse_clear_messages and self.sealer is not None:
            self.stats["clear_refused"] += 1
            log.warning(
                "%s: clear-text message on %s refused (this device takes sealed ones only)",
                self.client_id,
                message.topic,
            )
            return
        self.handle_message(parsed.channel, payload)

    def handle_message(self, channel: str, payload: bytes) -> str | None:
        """Process one console message (what arrives on ``rx/<id>/<channel>``). Returns the ack status
        sent, or None when nothing was sent (a duplicate, or a message too broken to answer)."""
        try:
            message = protocol.decode(payload, channel=channel)
        except protocol.ProtocolError as exc:
            self.stats["invalid"] += 1
            log.warning("%s: invalid message on %s: %s", self.client_id, channel, exc)
            if exc.message_id is None or not self.dedup.first_time(exc.message_id):
                return None
            self._ack(exc.message_id, exc.message_type or "unknown", "rejected", detail=str(exc))
            return "rejected"
        message_id, message_type = message["id"], message["type"]
        if not self.dedup.first_time(message_id):
            self.stats["duplicates"] += 1
            self.events.duplicate(self, message_id)
            return None
        expires = message.get("expires")
        if expires is not None and expires < time.time():
            self._ack(message_id, message_type, "expired", detail="received after its expiry time; not executed")
            return "expired"
        handler = self._handlers.get(message_type)
        status, detail, result = "ok", None, None
        try:
            if handler is None:
                raise CommandRejected(f"{message_type!r} is not handled by this device")
            outcome = handler(self, message)
            if isinstance(outcome, tuple):
                detail, result = outcome
            else:
                result = outcome
        except (CommandRejected, FirmwareRejected, CertificateRejected) as exc:
            status, detail = "rejected", str(exc)
        except Exception as exc:
            log.exception("%s: handling %s %s failed", self.client_id, message_type, message_id)
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
        self._ack(message_id, message_type, status, detail=detail, result=result)
        return status

    # Handlers return a result mapping, or (detail, result); raising *Rejected answers "rejected".
    def _handle_command(self, message: dict):
        name, args = message["name"], message.get("args") or {}
        handler = self.command_handlers.get(name)
        if handler is not None:
            return handler(args)
        if name == "ping":
            return {"uptime": round(time.time() - self.boot_time, 3), "firmware": self.firmware_version}
        if name == "publish_status":
            self.publish_status()
            return None
        raise CommandRejected(f"unknown command {name!r}")

    def _handle_config(self, message: dict):
        if self.config_handler is None:
            raise CommandRejected("this device takes no configuration")
        revision = message.get("revision")
        if revision is not None and self.config_revision is not None and revision < self.config_revision:
            raise CommandRejected(f"revision {revision} is older than the running revision {self.config_revision}")
        result = self.config_handler(message["config"], revision)
        if revision is not None:
            self.config_revision = revision
        return result

    def _handle_credentials(self, message: dict):
        new = Credential(
            secret=message["secret"], credential_id=message.get("credential_id", ""), received_at=time.time()
        )
        credentials = self.store.load()
        # Saved before the ack: the console switches the broker over only after it has the ack.
        self.store.save(credentials.rotated(new, proven=self._session_credential))
        self.stats["rotations"] += 1
        return ("stored; the previous secret is kept until the new one is accepted", None)

    def _handle_certificate_renew(self, message: dict):
        pair = make_key_and_csr(self.client_id, message.get("key_type") or "ec-p256")
        credentials = self.store.load()
        self.store.save(
            dataclasses.replace(credentials, pending_key_pem=pair.private_key_pem, pending_request_id=message["id"])
        )
        payload = protocol.encode("csr", id=self._next_id(), ts=time.time(), ref=message["id"], csr=pair.csr_pem)
        self._mqtt.publish(self.csr_topic, self._sealed(self.csr_topic, payload), qos=1)
        return ("key made on the device; CSR sent", None)

    def _handle_certificate(self, message: dict):
        credentials = self.store.load()
        if credentials.pending_key_pem is None or credentials.pending_request_id != message["ref"]:
            raise CertificateRejected(f"no certificate request {message['ref']!r} is pending on this device")
        serial = check_certificate(
            message["certificate"], private_key_pem=credentials.pending_key_pem, client_id=self.client_id
        )
        self.store.save(
            dataclasses.replace(
                credentials,
                certificate_pem=message["certificate"],
                chain_pem=message.get("chain"),
                private_key_pem=credentials.pending_key_pem,
                pending_key_pem=None,
                pending_request_id=None,
            )
        )
        self.certificate_serial = serial
        if self.tls is not None:
            self._rebuild_client = True  # the next connection presents the new certificate
        return {"serial": serial}

    def _handle_firmware_offer(self, message: dict):
        offer = FirmwareOffer.from_message(message)
        verify_offer(offer, self.firmware_public_key)
        if not self.allow_downgrade and is_downgrade(offer.version, self.firmware_version):
            raise FirmwareRejected(f"{offer.version} is older than the running {self.firmware_version}")
        if self.firmware_hook is None:
            raise FirmwareRejected("this device does not take firmware updates over MQTT")
        if not self.firmware_hook(offer):
            raise FirmwareRejected("declined by the device")
        return ("signature verified; accepted", {"version": offer.version})

    _handlers: dict[str, Callable[[DeviceClient, dict], Any]] = {
        "command": _handle_command,
        "config": _handle_config,
        "credentials": _handle_credentials,
        "certificate_renew": _handle_certificate_renew,
        "certificate": _handle_certificate,
        "firmware_offer": _handle_firmware_offer,
    }
