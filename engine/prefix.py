"""Ids given by a unique prefix, as git takes commit ids: pure functions.

Tables show ids shortened to ``short_ids``; every command that takes an id
accepts such a prefix (``match_prefix``). An ambiguous prefix is an error that
lists the candidates; nothing is chosen for the user.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import AmbiguousId

#: Shortest prefix shown in a table (more when needed to tell ids apart).
MIN_SHOWN = 8
#: Candidates named in an ambiguity error, at most.
MAX_LISTED = 5


def match_prefix(given: str, ids: Iterable[str], what: str) -> str | None:
    """The one id of ``ids`` equal to ``given`` or starting with it
    (case-insensitive), or None when none does. Raises AmbiguousId (the
    message lists up to ``MAX_LISTED`` candidates) when several do."""
    wanted = given.strip().lower()
    if not wanted:
        return None
    found: list[str] = []
    for candidate in ids:
        low = candidate.lower()
        if low == wanted:
            return candidate
        if low.startswith(wanted):
            found.append(candidate)
    if len(found) > 1:
        listed = ", ".join(sorted(found)[:MAX_LISTED])
        more = f" and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        raise AmbiguousId(
            f"{what} {given!r} is ambiguous: it starts {len(found)} ids ({listed}{more}); "
            "give more characters"
        )
    return found[0] if found else None


def short_ids(ids: Iterable[str], minimum: int = MIN_SHOWN) -> dict[str, str]:
    """Each id -> its shortest prefix of at least ``minimum`` characters
    that no other of ``ids`` starts with (the whole id if need be)."""
    unique = sorted(set(ids), key=str.lower)
    out: dict[str, str] = {}
    for i, current in enumerate(unique):
        need = minimum
        for other in (unique[i - 1] if i else None, unique[i + 1] if i + 1 < len(unique) else None):
            if other is not None:
                need = max(need, _common(current.lower(), other.lower()) + 1)
        out[current] = current[:need]
    return out


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
