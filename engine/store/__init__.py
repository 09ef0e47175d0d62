"""The node store: one SQLite file per node home (DESIGN §7)."""

from .node_store import FORMAT_VERSION, STORE_FILE, NodeStore

__all__ = ["FORMAT_VERSION", "STORE_FILE", "NodeStore"]
