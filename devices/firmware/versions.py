"""Firmware version strings: what the registry accepts and how versions are ordered.

Accepted: one to four dot-separated numbers, an optional leading ``v`` and an optional pre-release suffix after a
hyphen, semver-style: ``2``, ``1.9``, ``1.10.0``, ``v2.4.1``, ``3.0.0-rc.1``, ``1.2.3.4``. Numbers compare as
numbers (``1.10`` > ``1.9``), missing parts are zeros (``1.2`` is ``1.2.0``, so both cannot be released for one
model), and a pre-release sorts before its release (``3.0.0-rc.1`` < ``3.0.0``; identifiers compare as in semver).
Anything else (build metadata ``+abc``, dates with slashes, spaces) is refused with a message that says so.
"""

from __future__ import annotations

import re

MAX_PARTS = 4
MAX_NUMBER = 999_999
PATTERN = re.compile(r"v?(?P<numbers>\d{1,6}(?:\.\d{1,6}){0,3})(?:-(?P<pre>[0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*))?")
FORMAT_HELP = (
    "Use one to four dot-separated numbers (each up to 999999), optionally a leading 'v' and a pre-release suffix "
    "after a hyphen: 1.10.0, v2.4, 3.0.0-rc.1."
)


class InvalidVersion(ValueError):
    pass


def parse(version: str) -> tuple | None:
    """The ordering key of ``version``, or None when it is not in the accepted format."""
    match = PATTERN.fullmatch(version.strip()) if isinstance(version, str) else None
    if match is None:
        return None
    numbers = [int(n) for n in match.group("numbers").split(".")]
    numbers += [0] * (MAX_PARTS - len(numbers))
    pre = match.group("pre")
    if pre is None:
        return (tuple(numbers), (1,))
    identifiers = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (tuple(numbers), (0, identifiers))


def validate(version: str) -> str:
    """The version, stripped; InvalidVersion with the accepted format otherwise."""
    text = (version or "").strip()
    if not text:
        raise InvalidVersion("A version is required. " + FORMAT_HELP)
    if len(text) > 64:
        raise InvalidVersion("The version is longer than 64 characters. " + FORMAT_HELP)
    if parse(text) is None:
        raise InvalidVersion(f"{text!r} is not a version the registry can order. " + FORMAT_HELP)
    return text


def sort_key(version: str) -> str:
    """A string that sorts like ``parse`` (for the database's ORDER BY and the one-release-per-version rule)."""
    key = parse(version)
    if key is None:
        raise InvalidVersion(f"{version!r} is not a version the registry can order. " + FORMAT_HELP)
    numbers, rest = key
    text = ".".join(f"{n:06d}" for n in numbers)
    if rest == (1,):
        return text + "~"  # '~' sorts after '-': a release after its pre-releases
    parts = [f"0{n:06d}" if kind == 0 else f"1{name}" for kind, n, name in rest[1]]
    return text + "-" + ".".join(parts)


def compare(a: str, b: str) -> int | None:
    """-1, 0 or 1; None when either is not in the accepted format (never guess an order)."""
    ka, kb = parse(a), parse(b)
    if ka is None or kb is None:
        return None
    return (ka > kb) - (ka < kb)
