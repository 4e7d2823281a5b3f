"""The device PKI: a fleet root CA and an issuing CA, device certificates from CSRs, the CRL the broker loads.

``ca``, ``csr`` and ``crl`` are pure functions over ``cryptography`` objects (no database, no disk);
``services`` stores, audits and enqueues enforcement. docs/pki.md explains the hierarchy and the rules."""
