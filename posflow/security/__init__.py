"""Security baseline: terminal PKI, merchant keys, roles, the audit trail, profiles.

- :mod:`posflow.security.pki` -- the CA, terminal certificates, the CRL (Mosquitto TLS).
- :mod:`posflow.security.keys` -- per-merchant keys from a master key, secrets at rest,
  revocation (crypto-shredding) and rotation.
- :mod:`posflow.security.roles` -- the permission matrix and ``authorize``.
- :mod:`posflow.security.audit` -- the hash-chained audit trail and its verification.
- :mod:`posflow.security.production` -- ``refuse_dev_defaults`` for the production profile.
- :mod:`posflow.security.tls` -- TLS options of PostgreSQL, Kafka and MQTT clients.
- :mod:`posflow.security.apikeys` -- API keys (``pf_<key id>_<secret>``): issue, parse, revoke.
- :mod:`posflow.security.apiauth` -- an API key becomes a principal with a role (HTTP APIs).
- :mod:`posflow.security.problems` -- RFC 9457 problem details, free of any web framework.

Import from the modules; this package imports nothing heavy on its own.
"""

from __future__ import annotations

from posflow.security.production import refuse_dev_defaults
from posflow.security.roles import (
    AccessDeniedError,
    Action,
    Principal,
    Role,
    Target,
    authorize,
)

__all__ = [
    "AccessDeniedError",
    "Action",
    "Principal",
    "Role",
    "Target",
    "authorize",
    "refuse_dev_defaults",
]
