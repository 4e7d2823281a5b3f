"""docs/device-protocol.md is what firmware teams build against: its schemas and examples must be the ones the
library enforces."""

import json
from pathlib import Path

import pytest

from fleetkeeper_device.protocol import MESSAGES, json_schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "device-protocol.md"


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_the_document_shows_the_schema_and_the_example_the_library_enforces(message_type):
    text = DOC.read_text()
    assert f"#### `{message_type}` — on `" in text
    assert json.dumps(json_schema(message_type), indent=2) in text, f"regenerate the {message_type} schema in {DOC}"
    assert json.dumps(MESSAGES[message_type].example, indent=2) in text


def test_the_document_lists_every_channel_with_its_topic():
    text = DOC.read_text()
    for channel in ("telemetry", "status", "ack", "csr"):
        assert f"`tx/<client_id>/{channel}`" in text
    for channel in ("command", "config", "credentials", "firmware"):
        assert f"`rx/<client_id>/{channel}`" in text
