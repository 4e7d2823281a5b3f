"""Device replies (acks on tx/<id>/ack, CSRs on tx/<id>/csr) handed over by the MQTT consumer once per batch."""

from __future__ import annotations


def device_replies_received(replies: list[tuple[str, str, dict]]) -> None:
    """(client_id, channel, decoded message) for every ack and CSR of one consumer batch. Not built yet: the
    rotation work (issue 7) fills this in; until then replies are only counted by the consumer."""
    return None
