"""MQTT for the console's own short-lived broker clients (the canary, connect checks, session watchers, the TLS
session cut-off): paho driven by epoll instead of paho's own loop(), which uses select() and fails in a process
holding descriptors numbered 1024 or more (found by the benchmark). Speaks to any MQTT 3.1.1 broker."""

from __future__ import annotations

import selectors
import time

import paho.mqtt.client as mqtt

from .base import BrokerUnavailable


def mqtt_step(client: mqtt.Client, timeout: float) -> int:
    """One turn of paho's network loop driven by epoll (selectors) instead of paho's own loop(), which uses
    select() and fails in a process holding descriptors numbered 1024 or more."""
    sock = client.socket()
    if sock is None:
        return mqtt.MQTT_ERR_NO_CONN
    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
    with selectors.DefaultSelector() as selector:
        selector.register(sock, events)
        ready = selector.select(timeout)
    rc = mqtt.MQTT_ERR_SUCCESS
    for _key, mask in ready:
        if mask & selectors.EVENT_READ:
            rc = client.loop_read()
        if rc == mqtt.MQTT_ERR_SUCCESS and mask & selectors.EVENT_WRITE:
            rc = client.loop_write()
    if rc == mqtt.MQTT_ERR_SUCCESS:
        rc = client.loop_misc()
    return rc


def loop_until(client: mqtt.Client, condition, deadline: float) -> None:
    while not condition() and time.monotonic() < deadline:
        rc = mqtt_step(client, 0.01)
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            raise ConnectionError(f"connection lost ({mqtt.error_string(rc)})")


def mqtt_close(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def connected_client(host: str, port: int, *, username: str, password: str, timeout: float):
    """(client, 0) once connected; (None, reason code) when refused. BrokerUnavailable when nobody listens."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    outcome: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(reason.value)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise BrokerUnavailable(f"The broker does not answer on {host}:{port} ({exc}).") from exc
    deadline = time.monotonic() + timeout
    while not outcome and time.monotonic() < deadline:
        rc = mqtt_step(client, 0.01)
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            break
    code = outcome[0] if outcome else 135  # no CONNACK: treat as refused (v5 "not authorized")
    if code != 0:
        mqtt_close(client)
        return None, code
    return client, 0


def connect_code(host: str, port: int, *, username: str, password: str, timeout: float = 2.0) -> int:
    """The CONNACK code for these credentials (0 = accepted)."""
    client, code = connected_client(host, port, username=username, password=password, timeout=timeout)
    if client is not None:
        client.disconnect()
        mqtt_step(client, 0.01)
        mqtt_close(client)
    return code
