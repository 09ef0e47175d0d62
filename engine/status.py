"""The node status that ``branchline status`` prints and the branch server
serves (``GET /api/v1/status``): one function, so both show the same."""

from __future__ import annotations

from typing import Any

from .names import META_TOKEN_REFUSED
from .node import Node
from .sync import failure_counts
from .transport import run_status, safe_url
from .transport.client import META_LAST_ERROR, META_LAST_REACHED


def node_status(node: Node, now_ms: int, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dataset, node, whether a sync loop is connected (``online``,
    ``state``, ``offline_mode``), relay URL (without credentials), last
    completed sync pass (wall ms or None), records waiting to go up per
    collection and in all, received records waiting for a reference,
    open conflicts, sync failures per direction, whether the relay refused
    the token, whether this node knows its voucher numbers' high-water
    mark (else it issues provisional numbers), when it last had a session
    with the relay (``last_reached``, wall ms or None) and why its latest
    attempt to sync failed, since when (``last_error``, or None once a
    session opened again), and the captured tables' changes still queued
    and quarantined (``capture``).

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
        "urgent_pending": node.urgent_pending(),
        "waiting": node.waiting(),
        "conflicts": len(node.conflicts()),
        "failures": failure_counts(node),
        "token_refused": token_refused(meta),
        "numbering_known": node.numbering_known(),
        "last_reached": last_reached(meta, run),
        "last_error": _stamped(meta.get(META_LAST_ERROR)),
        "capture": node.capture_status(),
    }


def last_reached(meta: dict[str, str], run: dict[str, Any]) -> int | None:
    """Wall ms the node last had a session with the relay: the heartbeat of
    a loop online now, else the time recorded (None: never)."""
    raw = meta.get(META_LAST_REACHED, "")
    recorded = int(raw) if raw.isdigit() else None
    beat = run.get("heartbeat")
    if run.get("online") and isinstance(beat, int):
        return max(beat, recorded or 0)
    return recorded


def token_refused(meta: dict[str, str]) -> dict[str, Any] | None:
    """When and why the relay last refused the token (node meta), or None."""
    return _stamped(meta.get(META_TOKEN_REFUSED))


def _stamped(raw: str | None) -> dict[str, Any] | None:
    """``{"at": ms, "message": ...}`` of a "<ms> <message>" meta value."""
    if not raw:
        return None
    at, _, why = raw.partition(" ")
    return {"at": int(at) if at.isdigit() else 0, "message": why}
