"""The node store: one SQLite file per node home (DESIGN §7), one module per
concept: ``doclog`` (update log, snapshots, compaction, clients), ``outbox``,
``records`` (the materializer and record reads), ``failures`` (sync
failures), ``meta``; ``node_store`` holds the file, its format and the write
transaction ``WriteTxn`` every writer goes through."""

from .node_store import FORMAT_VERSION, STORE_FILE, NodeStore
from .txn import WriteTxn

__all__ = ["FORMAT_VERSION", "STORE_FILE", "NodeStore", "WriteTxn"]
