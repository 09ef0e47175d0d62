"""Names of datasets, nodes and documents: one definition for every layer
(node, protocol, relay). Pure: imports nothing of the engine.

``\\Z``, not ``$``: ``$`` also matches before a trailing newline.
"""

from __future__ import annotations

import re

DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z")
# A collection name, then for partitioned voucher books "/YYYY" or "/YYYY-MM".
DOC_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}(/\d{4}(-\d{2})?)?\Z")
#: Node meta key: when and why the relay last refused this node's token
#: (cleared by a session the relay accepts, or a new token).
META_TOKEN_REFUSED = "token_refused"
# Node meta: the PEM file of the CA that signed the relay's certificate.
META_RELAY_CA = "relay_ca"


# A relay URL: ws:// or wss://, then a host (this module imports nothing but re).
RELAY_URL_RE = re.compile(r"^wss?://[^/?#\s]+", re.IGNORECASE)


def relay_url_ok(url: str) -> bool:
    """A ``ws://`` or ``wss://`` URL with a host, or several, comma-separated
    (relays of one store, tried in turn: failover)."""
    parts = url.split(",")
    return all(RELAY_URL_RE.match(part.strip()) is not None for part in parts)


def relay_urls(value: str) -> list[str]:
    """The URLs of a relay setting (one, or several comma-separated), in order."""
    return [part.strip() for part in value.split(",") if part.strip()]


# A workstation user of the branch server (engine.users).
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
