"""Broker adapters: the interface (base), the default MosquittoFiles adapter (files) and the pure rendering
(render). ``get_adapter()`` builds the adapter named in settings.MQTT_BROKER_ADAPTER."""

from __future__ import annotations

import getpass
import os

from django.conf import settings
from django.utils.module_loading import import_string

from security.enforcement.state import consumer_usernames

from .base import BrokerAdapter, BrokerError, BrokerRejected, BrokerUnavailable  # noqa: F401
from .hook_adapter import HookBrokerAdapter
from .render import COMMANDER, CONSUMER, MONITOR, PROBE, SESSIONS, SESSIONS_USERNAME, BrokerConfig, ConsoleIdentity


def broker_run_as() -> str:
    """The user Mosquitto runs as: settings.MQTT_BROKER_RUN_AS, else whoever renders the files. Started as root
    without a `user` line Mosquitto would switch to `mosquitto`, which could not read files owned by root."""
    if settings.MQTT_BROKER_RUN_AS:
        return settings.MQTT_BROKER_RUN_AS
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for the uid (some containers)
        return "root" if os.geteuid() == 0 else ""


def broker_config(*, with_tls: bool = True) -> BrokerConfig:
    """``with_tls=False``: without the TLS material (certificates, CRL), for callers that only need addresses and
    paths (the adapter); the rendered policy carries the material it writes."""
    tls = None
    if with_tls:
        from security.pki.services import broker_tls_material

        tls = broker_tls_material()
    return BrokerConfig(
        broker_dir=str(settings.MQTT_BROKER_DIR),
        host=settings.MQTT_HOST,
        port=settings.MQTT_PORT,
        tls_port=settings.MQTT_TLS_PORT,
        rx_prefix=settings.MQTT_TOPIC_RX_PREFIX,
        tx_prefix=settings.MQTT_TOPIC_TX_PREFIX,
        max_packet_size=settings.MQTT_MAX_PACKET_SIZE,
        max_keepalive=settings.MQTT_MAX_KEEPALIVE,
        max_connections=settings.MQTT_MAX_CONNECTIONS,
        max_queued_messages=settings.MQTT_MAX_QUEUED_MESSAGES,
        max_queued_bytes=settings.MQTT_MAX_QUEUED_BYTES,
        max_inflight_messages=settings.MQTT_MAX_INFLIGHT_MESSAGES,
        iterations=settings.MQTT_PASSWORD_ITERATIONS,
        run_as=broker_run_as(),
        shared_group=settings.MQTT_SHARED_SUBSCRIPTION_GROUP,
        tls=tls,
        plain_listener=settings.MQTT_PLAIN_LISTENER,
        # DETECTION_DENIED_PUBLISHES (docs/detection.md); the monitor tails the same path (monitor.debug_log_path).
        debug_log=os.path.join(str(settings.MQTT_BROKER_DIR), "broker-debug.log")
        if settings.DETECTION_DENIED_PUBLISHES
        else "",
    )


def console_identities() -> list[ConsoleIdentity]:
    identities = [ConsoleIdentity(name, CONSUMER, settings.MQTT_CONSUMER_PASSWORD) for name in consumer_usernames()]
    identities.append(ConsoleIdentity(settings.MQTT_MONITOR_USERNAME, MONITOR, settings.MQTT_MONITOR_PASSWORD))
    identities.append(ConsoleIdentity(settings.MQTT_PROBE_USERNAME, PROBE, settings.MQTT_PROBE_PASSWORD))
    identities.append(ConsoleIdentity(settings.MQTT_COMMANDER_USERNAME, COMMANDER, settings.MQTT_COMMANDER_PASSWORD))
    identities.append(ConsoleIdentity(SESSIONS_USERNAME, SESSIONS, settings.MQTT_SESSIONS_PASSWORD))
    return identities


def get_adapter() -> BrokerAdapter | HookBrokerAdapter:
    """The adapter for settings.BROKER_BACKEND: MQTT_BROKER_ADAPTER for Mosquitto (the rendered files), the
    HTTP-hook adapters for RabbitMQ and EMQX."""
    if settings.BROKER_BACKEND == "rabbitmq":
        return import_string("security.brokers.rabbitmq.RabbitMQCluster")()
    if settings.BROKER_BACKEND == "emqx":
        return import_string("security.brokers.emqx.EMQXCluster")()
    adapter_class = import_string(settings.MQTT_BROKER_ADAPTER)
    return adapter_class(
        broker_config(with_tls=False),
        probe_username=settings.MQTT_PROBE_USERNAME,
        probe_timeout=settings.MQTT_PROBE_TIMEOUT,
    )


def broker_capabilities() -> dict:
    """What the configured broker can and cannot do (the adapter's ``capabilities()``): whether it speaks MQTT 5,
    has shared subscriptions, where its refusals are read ("log": Mosquitto's $SYS log, "hook": the hook's events),
    how it refuses, whether it can kick. The console's own clients ask this instead of knowing broker names."""
    return get_adapter().capabilities()
