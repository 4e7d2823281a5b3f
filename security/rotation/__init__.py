"""Credential rotation (issue 7): policies, the device-confirmed handover, campaigns in waves (docs/rotation.md)."""
