"""Detection: the MQTT telemetry consumer, the broker-log monitor, the rules that turn what they see into alerts,
and the alert services. See docs/detection.md for what each detector sees and what the broker does not tell us."""
