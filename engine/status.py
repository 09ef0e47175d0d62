"""The node status that ``branchline status`` prints and the branch server
serves (``GET /api/v1/status``): one function, so both show the same."""

from __future__ import annotations

from typing import Any

from .names import META_TOKEN_REFUSED
from .node import Node
from .sync import failure_counts
from .transport import run_status, safe_url


def node_status(node: Node, now_ms: int, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dataset, node, whether a sync loop is connected (``online``,
    ``state``, ``offline_mode``), relay URL (without credentials), last
    completed sync pass (wall ms or None), records waiting to go up per
    collection and in all, received records waiting for a reference,
    open conflicts, sync failures per direction, whether the relay refused
    the token, and whether this node knows its voucher numbers' high-water
    mark (else it issues provisional numbers).

    ``run`` is what ``engine.transport.run_status`` returns; by default it
    is read from the store (the heartbeat of a ``node run`` or ``node
    serve``), a server passes its own sync loop's."""
    meta = node.store.meta()
    if run is None:
        run = run_status(node, now_ms)
    last = meta.get("last_sync")
    relay = meta.get("relay")
    pending = node.pending()
    return {
        "dataset": node.dataset,
        "node": node.node_id,
        "online": bool(run["online"]),
        "state": str(run["state"]),
        "offline_mode": bool(run["offline_mode"]),
        "relay": safe_url(relay) if relay else None,
        "last_sync": int(last) if last else None,
        "pending": pending,
        "pending_total": sum(pending.values()),
        "waiting": node.waiting(),
        "conflicts": len(node.conflicts()),
        "failures": failure_counts(node),
        "token_refused": token_refused(meta),
        "numbering_known": node.numbering_known(),
    }


def token_refused(meta: dict[str, str]) -> dict[str, Any] | None:
    """When and why the relay last refused the token (node meta), or None."""
    raw = meta.get(META_TOKEN_REFUSED)
    if not raw:
        return None
    at, _, why = raw.partition(" ")
    return {"at": int(at) if at.isdigit() else 0, "message": why}
