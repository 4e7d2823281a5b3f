"""The enforcement core (design.md, "Enforcement core and broker adapters"): what every identity may do, known to
no broker. ``policy`` holds the rules as data, ``decisions`` answers a broker's questions from them, ``state``
reads them from the database, ``secrets`` is the stored form of a secret. The broker adapters
(security/brokers/) import this package; it imports none of them (an import-linter contract)."""
