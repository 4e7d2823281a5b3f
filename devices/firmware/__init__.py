"""The signed firmware registry (docs/firmware.md): releases per device model, the signing key, offers to devices."""
