"""Branchline engine: records with merge semantics, the node store, voucher
series and replication. Start with ``engine.Node``."""

from .errors import BranchlineError
from .node import ImportReport, Node, Posted

__all__ = ["BranchlineError", "ImportReport", "Node", "Posted"]
__version__ = "0.1.0"
