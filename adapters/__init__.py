"""Adapters turn CRDT state into SQL tables (DESIGN §8). Plugins register in
the entry-point group ``branchline.adapters``."""
