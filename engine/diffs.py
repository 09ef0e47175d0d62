"""What a node sends a replica of one document (``Node.export_parts``): the
whole diff, an own-only diff (only this node's items and deletions, for a
relay that checks authorship), or the outbox rows merged in parts under a
size limit. Plain functions on a loaded document and outbox rows."""

from __future__ import annotations

from .crdt import MAX_MERGE, RecordDoc, merge
from .crdt.deleteset import delete_set_only, encode_delete_set, keep_clients
from .crdt.statevec import decode_state_vector, encode_state_vector, read_uint
from .errors import UpdateError

EMPTY_UPDATE = b"\x00\x00"
Parts = list[tuple[list[int], bytes]]  # (outbox seqs carried, update)
OutboxRows = list[tuple[int, bytes, str]]  # (seq, update, origin)


def parts(
    doc: RecordDoc | None,
    since: bytes | None,
    rows: OutboxRows,
    max_bytes: int,
    own: tuple[set[int], int] | None,
) -> Parts:
    """What a replica in state ``since`` lacks of ``doc`` (None: the node
    does not hold it), as updates of at most ``max_bytes`` each, each with
    the outbox seqs it carries (``rows``: the document's outbox, read before
    ``doc`` was brought up to date). With ``own`` (this home's clients, this
    instance's client), only those clients' items and deletions plus the
    outbox rows the diff would not hold (``Node.export_parts``). Raises
    UpdateError for an invalid state vector or an own-only diff that cannot
    be split safely."""
    seqs = [seq for seq, _, _ in rows]
    if doc is None:
        return [(seqs, EMPTY_UPDATE)] if rows else []
    whole: bytes | None
    if own is not None:
        mine, client_id = own
        whole = own_diff(doc, since, mine, client_id)
        extra = [d for _, d, origin in rows if origin != "local" or writer_of(d) not in mine]
        if extra:
            fits = len(whole) + sum(map(len, extra)) <= max_bytes
            whole = merged([whole, *extra]) if fits else None
    else:
        whole = doc.diff(since)
    if whole is not None and len(whole) <= max_bytes:
        return [(seqs, whole)] if whole != EMPTY_UPDATE or rows else []
    if whole is not None and not rows:
        # Nothing in the outbox to split it by (the relay lost acknowledged
        # work, say restored from an older backup): send it whole rather
        # than nothing. The relay takes it or refuses it, and a refusal is a
        # sync failure the user sees.
        return [([], whole)]
    del whole
    out: Parts = []
    group: list[tuple[int, bytes]] = []
    size = 0
    for seq, data, _ in rows:
        if group and (size + len(data) > max_bytes // 2 or len(group) >= MAX_MERGE):
            out.append(([s for s, _ in group], merge([d for _, d in group])))
            group, size = [], 0
        group.append((seq, data))
        size += len(data)
    if group:
        out.append(([s for s, _ in group], merge([d for _, d in group])))
    return out


def own_diff(doc: RecordDoc, since: bytes | None, mine: set[int], client_id: int) -> bytes:
    """``doc``'s diff against ``since`` holding only the items of clients
    ``mine`` and their deletions. Raises UpdateError for an invalid state
    vector, or when the diff does not end with the document's delete set as
    expected."""
    local = decode_state_vector(doc.state_vector())
    state = decode_state_vector(since) if since is not None else {}
    for client, clock in local.items():
        if client not in mine:
            state[client] = clock  # the replica "has" them: the diff skips them
    # An empty state vector would also bring items waiting for missing
    # updates (pycrdt adds them then); an entry at clock 0 changes nothing else.
    state.setdefault(client_id, 0)
    local.setdefault(client_id, 0)
    diff = doc.diff(encode_state_vector(state))
    # A diff is the structs the replica lacks followed by the document's
    # whole delete set, which is all a diff against the document's own
    # state holds.
    tail = doc.diff(encode_state_vector(local))
    deletions = tail[1:]
    if not diff.endswith(deletions):
        raise UpdateError(
            f"document {doc.name}: cannot leave other nodes' changes out of the "
            "update (its delete set is not where expected); nothing was sent"
        )
    kept = keep_clients(delete_set_only(tail), mine.__contains__)
    return diff[: len(diff) - len(deletions)] + encode_delete_set(kept)


def merged(blobs: list[bytes], step: int = MAX_MERGE) -> bytes:
    """One update holding all of ``blobs`` (at least one), merged ``step`` at
    a time. Raises UpdateError for bytes that are not updates."""
    while len(blobs) > 1:
        blobs = [merge(blobs[i : i + step]) for i in range(0, len(blobs), step)]
    return blobs[0]


def writer_of(update: bytes) -> int | None:
    """The client id of an update's structs when they are one client's (a
    local write always is), else None. Never raises."""
    try:
        groups, pos = read_uint(update, 0)
        if groups != 1:
            return None
        _, pos = read_uint(update, pos)  # the group's struct count
        client, _ = read_uint(update, pos)
    except UpdateError:
        return None
    return client
