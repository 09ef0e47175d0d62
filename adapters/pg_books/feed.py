"""Feeding the head-office books: the reporting home's queue
(``adapters.pg_books``) into one PostgreSQL schema per dataset.

Every batch is one PostgreSQL transaction that applies the changes and
stores the last queue number applied (``report_position``), so after a
crash, a killed connection or PostgreSQL restarting, feeding resumes after
exactly what committed. ``report_position`` also names the home feeding the
schema: another home (or a home created again, whose queue numbers start
over) is refused until ``branchline report rebuild``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from adapters.accounting import VOUCHER_BOOKS
from engine import Node
from engine.errors import ReportingError, ReportingUnreachable
from engine.plugins import RecordChange

from . import NAME, QUEUE, pending, queued_upto
from .books import PgBooks, PgConn

log = logging.getLogger("branchline.report")

BATCH = 1000  # queued changes per PostgreSQL transaction (a batch of 5,000 took seconds)
POLL_S = 0.02  # how often an idle follower looks at the queue
BATCH_EVERY_S = 0.1  # the shortest time between two batches' starts
FORGET_EVERY_S = 1.0  # how often applied rows leave the queue
PROGRESS_EVERY = 20_000  # records between progress lines of a rebuild
CONNECT_TIMEOUT_S = 5
FORGOTTEN_META = "pg_books_forgotten"
POSITION_DDL = (
    "CREATE TABLE IF NOT EXISTS report_position (one BOOLEAN PRIMARY KEY DEFAULT TRUE "
    "CHECK (one), home TEXT NOT NULL, seq BIGINT NOT NULL, "
    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)
_URL = re.compile(r"(postgres(?:ql)?://[^:/@]*:)[^@]*@")


def home_identity(node: Node) -> str:
    """What names a reporting home in ``report_position``: its dataset, its
    node and when the home was made (a home made again starts its queue over)."""
    created = node.store.get_meta("created_at") or "0"
    return f"{node.dataset}/{node.node_id}/{created}"


def shown_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return _URL.sub(r"\1***@", url)


class ReportBooks:
    """The books of one dataset in one PostgreSQL schema, on one connection.
    Not thread-safe. Every method raises ReportingUnreachable when
    PostgreSQL cannot be reached or the connection breaks (the transaction
    under way rolled back) and ReportingError when the schema is fed by
    another home."""

    def __init__(self, url: str, pg_schema: str, node: Node) -> None:
        self.url = url
        self.pg_schema = pg_schema
        self.home = home_identity(node)
        self.books = PgBooks(node.schema)
        self._conn: psycopg.Connection[Any] | None = None

    # -- connection --------------------------------------------------------

    def _connected(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise self._unreachable(exc) from None
        except Exception as exc:  # a malformed URL
            raise ReportingError(f"bad PostgreSQL URL {shown_url(self.url)}: {exc}") from None
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.pg_schema)))
        conn.commit()
        self._conn = conn
        return conn

    def _unreachable(self, exc: BaseException) -> ReportingUnreachable:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ReportingUnreachable(
            f"PostgreSQL {shown_url(self.url)}: {first}; the head-office books stay as "
            "they were (nothing half applied) and catch up when it is back"
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """``work`` in one transaction (committed when it returns)."""
        conn = self._connected()
        try:
            with conn.transaction():
                return work(conn)
        except psycopg.OperationalError as exc:
            self.close()
            raise self._unreachable(exc) from None
        except psycopg.Error as exc:
            if conn.broken:
                self.close()
                raise self._unreachable(exc) from None
            raise ReportingError(f"PostgreSQL refused the books' SQL: {exc}") from None

    # -- position ------------------------------------------------------------

    def position(self) -> int | None:
        """The last queue number the books hold, or None before the first rebuild."""
        return self._run(lambda conn: self._locked_position(conn, lock=False))  # type: ignore[no-any-return]

    def _locked_position(self, conn: psycopg.Connection[Any], lock: bool) -> int | None:
        # Feeding (lock) follows a position read: the table is there, and one
        # query less per batch counts on the hot path.
        if not lock:
            exists = conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'report_position'",
                (self.pg_schema,),
            ).fetchone()
            if not exists:
                return None
        row = conn.execute(
            "SELECT home, seq FROM report_position" + (" FOR UPDATE" if lock else "")
        ).fetchone()
        if row is None:
            return None
        if row[0] != self.home:
            raise ReportingError(
                f"PostgreSQL schema '{self.pg_schema}' holds the books fed by reporting home "
                f"{row[0]}, not this one ({self.home}); run 'branchline report rebuild' to "
                "rebuild them from this home"
            )
        return int(row[1])

    # -- feeding -------------------------------------------------------------

    def apply(self, changes: list[RecordChange], after: int, upto: int) -> bool:
        """Apply queued changes ``after`` < seq <= ``upto`` in one transaction
        and record ``upto``. False (nothing done) when the books no longer
        stand at ``after`` (a rebuild ran meanwhile): read the queue again."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            if self._locked_position(conn, lock=True) != after:
                return False
            self.books.apply(PgConn(conn), self._kinds(conn, changes))
            conn.execute("UPDATE report_position SET seq = %s, applied_at = now()", (upto,))
            return True

        return bool(self._run(work))

    @staticmethod
    def _kinds(conn: psycopg.Connection[Any], changes: list[RecordChange]) -> list[RecordChange]:
        """The queue keeps a record's latest change only, so its kind says
        nothing of what the books hold: a voucher is ``updated`` when it is
        there and ``inserted`` when it is not (no rows to clear)."""
        ids = [c.id for c in changes if c.kind != "deleted" and c.collection in VOUCHER_BOOKS]
        if not ids:
            return changes
        have = {
            row[0]
            for row in conn.execute("SELECT id FROM vouchers WHERE id = ANY(%s::text[])", (ids,))
        }
        return [
            c
            if c.kind == "deleted"
            else dataclasses.replace(c, kind="updated" if c.id in have else "inserted")
            for c in changes
        ]

    def rebuild(
        self,
        records: Iterable[RecordChange],
        upto: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Replace the books by what ``records`` (every live record, one
        snapshot of the home) make, standing at queue number ``upto``, in one
        transaction: an interrupted rebuild leaves the books as they were.
        Returns the number of records."""
        count = 0

        def counted() -> Iterator[RecordChange]:
            nonlocal count
            for record in records:
                count += 1
                if progress is not None and count % PROGRESS_EVERY == 0:
                    progress(count)
                yield record

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.pg_schema))
            )
            conn.execute(POSITION_DDL)
            conn.execute("LOCK TABLE report_position IN EXCLUSIVE MODE")
            self.books.rebuild(PgConn(conn), counted())  # drops and creates the tables
            conn.execute("DELETE FROM report_position")
            conn.execute(
                "INSERT INTO report_position (home, seq) VALUES (%s, %s)", (self.home, upto)
            )

        self._run(work)
        return count


def ensure_enabled(node: Node) -> None:
    """Enable the queue on the reporting home (once; it starts empty)."""
    if NAME not in node.adapters():
        node.enable_adapter(NAME)


def rebuild(
    node: Node, books: ReportBooks, progress: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Rebuild the books from one snapshot of ``node`` and forget the queue
    up to it. Returns (records, queue number)."""
    ensure_enabled(node)
    with node.store.reading() as conn:
        upto = queued_upto(conn)
        count = books.rebuild(node.live_records(books.books.collections), upto, progress)
    forget(node, upto)
    return count, upto


def forget(node: Node, upto: int) -> None:
    """Delete the queue rows the books hold (numbers up to ``upto``), and
    remember how far: books standing before that (a restored dump) miss
    changes the queue no longer has."""
    with node.store.transaction() as txn:
        txn.execute(f"DELETE FROM {QUEUE} WHERE seq <= ?", (upto,))
        if upto > forgotten(node):
            node.store.set_meta(FORGOTTEN_META, str(upto))


def forgotten(node: Node) -> int:
    """The queue numbers deleted so far are those up to this."""
    return int(node.store.get_meta(FORGOTTEN_META) or 0)


class Follower:
    """A thread that feeds the home's queue to PostgreSQL until ``stop``:
    on its own node connection and PostgreSQL connection, so the sync loop
    never waits for PostgreSQL. While PostgreSQL is unreachable it logs once
    and retries (``retry_s`` up to ``retry_max_s``); a home refused by the
    schema ends it with ``error`` set."""

    def __init__(
        self,
        home: Path,
        url: str,
        pg_schema: str,
        retry_s: float = 0.5,
        retry_max_s: float = 5.0,
    ) -> None:
        self.home, self.url, self.pg_schema = home, url, pg_schema
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self.error: BaseException | None = None
        self.position: int | None = None
        self.applied = self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="report-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            with Node.open(self.home) as node:
                books = ReportBooks(self.url, self.pg_schema, node)
                try:
                    self._follow(node, books)
                finally:
                    books.close()
        except BaseException as exc:
            self.error = exc
            log.error("reporting stopped: %s", exc)
        finally:
            log.info(
                "reporting: %d changes in %d batches, %.2f s CPU in the follower thread",
                self.applied,
                self.batches,
                time.thread_time(),
            )

    def _follow(self, node: Node, books: ReportBooks) -> None:
        wait = self.retry_s
        down_since: float | None = None
        deleted_upto = 0
        last_forget = last_batch = time.monotonic()
        while not self._stop.is_set():
            try:
                if self.position is None:
                    self.position = books.position()
                    if self.position is not None and self.position < forgotten(node):
                        log.warning(
                            "the books in schema '%s' stand before changes the queue no longer "
                            "holds (restored from an older dump?): rebuilding them",
                            self.pg_schema,
                        )
                        self.position = None
                    if self.position is None:
                        log.info("building the head-office books in schema '%s'", self.pg_schema)
                        count, self.position = rebuild(node, books, _progress)
                        log.info("books built from %d records", count)
                if down_since is not None:
                    log.info("PostgreSQL is back after %.0f s", time.monotonic() - down_since)
                    down_since, wait = None, self.retry_s
                if deleted_upto < self.position and time.monotonic() > last_forget + FORGET_EVERY_S:
                    forget(node, self.position)
                    deleted_upto, last_forget = self.position, time.monotonic()
                # At most one batch per BATCH_EVERY_S: a batch's fixed cost
                # (its round trips) outweighed small batches' changes (measured
                # 1,555 batches of 5.5 vouchers: 1.14 ms CPU per voucher; paced,
                # 324 batches: 0.43 ms).
                self._stop.wait(max(0.0, last_batch + BATCH_EVERY_S - time.monotonic()))
                changes, upto = pending(node.store.conn, self.position, BATCH)
                if not changes:
                    self._stop.wait(POLL_S)
                    continue
                last_batch = time.monotonic()
                if books.apply(changes, self.position, upto):
                    self.position = upto
                    self.applied += len(changes)
                    self.batches += 1
                else:
                    self.position = None  # rebuilt meanwhile: read its position
            except ReportingUnreachable as exc:
                if down_since is None:
                    log.warning("%s", exc)
                    down_since = time.monotonic()
                self.position = None  # read again once connected
                self._stop.wait(wait)
                wait = min(wait * 2, self.retry_max_s)


def _progress(count: int) -> None:
    log.info("rebuild: %d records", count)
