"""The ``branchline`` command line (issue 2 §7): a contract scripts rely on.

Every command takes ``--home DIR`` (default ``$BRANCHLINE_HOME``, else the
current directory). ``--json`` prints exactly one JSON document on stdout
(Decimal as strings, dates as ISO text); ``put``, ``voucher`` and ``delete``
always print their one JSON object. Any ``BranchlineError`` or usage mistake
becomes one line ``error: ...`` on stderr and the exit code of the error
(2 for user mistakes, 1 for problems of the environment or the data on disk);
user mistakes are caught before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, jsonio
from .errors import BranchlineError, RecordNotFound, UserError
from .exchange import export_to_file, import_from_file, save_state
from .names import META_RELAY_CA, relay_url_ok
from .node import Node
from .prefix import match_prefix, short_ids
from .query import json_cell
from .relay.cli import relay_group
from .stopping import SIGINT_EXIT, STOP_GRACE_S, exit_soon
from .wslog import LOG_FORMATS, configure_logging

HOME_HELP = "node home directory (default: $BRANCHLINE_HOME, else the current directory)"
MAX_INPUT_BYTES = 64 << 20  # fields JSON read from stdin
PIPE_WIDTH = 160  # columns of a table when stdout is not a terminal


# -- error handling ----------------------------------------------------------


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " | ".join(lines) or "unknown error"


def _fail(message: str) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)


class BranchlineGroup(click.Group):
    """The top-level group: turns every expected error into one stderr line
    and its exit code, also under click's test runner."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            # Without standalone mode click returns the exit code of --help and
            # --version, and the command's own return value (None) otherwise.
            code = rv if isinstance(rv, int) else 0
        except BranchlineError as exc:
            _fail(str(exc))
            code = exc.exit_code
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(exc.format_message() + hint)
            code = exc.exit_code
        except click.ClickException as exc:
            _fail(exc.format_message())
            code = exc.exit_code
        except click.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):
                code = SIGINT_EXIT  # Ctrl-C: the shell's code, no error line
            else:
                _fail("aborted")
                code = 1
        except BrokenPipeError:
            # The reader of stdout went away (e.g. `| head`): stop quietly, and
            # keep Python from complaining when it flushes stdout at exit.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, sys.stdout.fileno())
                finally:
                    os.close(devnull)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


# -- input and output --------------------------------------------------------


def parse_fields(text: str) -> dict[str, Any]:
    """A JSON object of fields with exact decimals (``-`` reads stdin).

    Raises UserError for anything that is not one JSON object.
    """
    if text == "-":
        raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        if len(raw) > MAX_INPUT_BYTES:
            raise UserError(f"JSON on stdin is longer than {MAX_INPUT_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("invalid JSON on stdin: not UTF-8 text") from None
    return jsonio.loads_object(text)


def to_json(value: Any) -> str:
    """One JSON document: Decimal as strings, dates as ISO text."""
    return jsonio.dumps(value, indent=True).decode()


def _emit(value: Any) -> None:
    click.echo(to_json(value))


def _console() -> Console:
    # Created per command, so it writes to the stdout of the moment (the test
    # runner swaps it); no colour codes when stdout is not a terminal.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped to a file or a pager: rich would assume 80 columns and fold
        # ids and numbers; a wider page keeps one record per line.
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "; ".join(
            " ".join(f"{k}={_show(v)}" for k, v in line.items())
            if isinstance(line, dict)
            else _show(line)
            for line in value
        )
    if isinstance(value, dict):
        return " ".join(f"{k}={_show(v)}" for k, v in value.items())
    return str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _private_home(home: Path, allow: bool) -> None:
    """Raise HomeExposed for a home others can read, unless ``allow``."""
    from .store.node_store import STORE_FILE
    from .store.private import require_private

    if not allow:
        require_private(home, STORE_FILE)


def _full_record_id(n: Node, collection: str, given: str) -> str:
    """``given`` as the node takes it: itself when it names a record (id or
    unique key), else the one record id it is a prefix of (as git takes
    commit ids). Raises AmbiguousId; an unknown ``given`` is returned as is,
    for the command's own not-found error."""
    n.collection(collection)  # UnknownCollection first
    if n.get(collection, given) is not None:
        return given
    found = match_prefix(given, n.record_ids_starting(collection, given), f"{collection} id")
    return found or given


def _record_labels(n: Node, collection: str, ids: Sequence[str]) -> list[str]:
    """Records as people know them: code or voucher number, with a short id
    (that every command takes) where the key does not tell them apart."""
    keys = n.record_keys(collection, ids)
    short = short_ids(ids)
    counts: dict[str | None, int] = {}
    for rid in ids:
        counts[keys[rid]] = counts.get(keys[rid], 0) + 1
    out = []
    for rid in ids:
        key = keys[rid]
        if key is None:
            out.append(short[rid])
        elif counts[key] > 1:
            out.append(f"{key} ({short[rid]})")
        else:
            out.append(key)
    return out


@contextlib.contextmanager
def _opened(home: Path) -> Iterator[Node]:
    node = Node.open(home)
    try:
        yield node
    finally:
        node.close()


home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BRANCHLINE_HOME",
    default=".",
    show_envvar=True,
    help=HOME_HELP,
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="print one JSON document on stdout"
)
# The commands that sync refuse a home others can read (it holds the token).
shared_home_option = click.option(
    "--allow-shared-home",
    "allow_shared",
    is_flag=True,
    help="sync even though other users can read the node home (it holds the relay token)",
)
log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="log lines on stderr as text, or one JSON object per line (for log shippers)",
)

F = TypeVar("F", bound=Callable[..., Any])


def sync_loop_options(fn: F) -> F:
    """The options of the commands that run the live sync loop (node run, node serve)."""
    for option in reversed(
        (
            click.option(
                "--backoff-max",
                type=click.FloatRange(0.1, 3600),
                default=3.0,
                show_default=True,
                help="longest wait between reconnection attempts to the relay, in seconds",
            ),
            click.option(
                "-v", "--verbose", is_flag=True, help="also log debug details (never frames)"
            ),
            log_format_option,
            shared_home_option,
        )
    ):
        fn = option(fn)
    return fn


# put, voucher and delete always print their one JSON object (the contract of
# issue 2 §7); --json is accepted so scripts may pass it to every command.
json_always_option = click.option(
    "--json", "as_json", is_flag=True, help="accepted for uniformity; the output is always JSON"
)


# -- commands ----------------------------------------------------------------


@click.group(cls=BranchlineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="branchline")
def cli() -> None:
    """Branchline: offline-first replication of business data.

    Exit codes: 0 done, 2 user mistake (nothing written), 1 anything else.
    """


@cli.group()
def node() -> None:
    """Create and inspect node homes."""


@node.command("init")
@home_option
@click.option("--dataset", required=True, help="dataset (company books) the node belongs to")
@click.option("--node", "node_name", required=True, help="node id, unique in the dataset")
@click.option(
    "--schema",
    default="accounting",
    show_default=True,
    help="built-in schema name or a schema TOML file",
)
@click.option(
    "--relay",
    default=None,
    help="relay URL (ws:// or wss://), or several comma-separated (failover); needs --token",
)
@click.option("--token", default=None, help="this node's relay token; needs --relay")
@click.option(
    "--ca",
    "ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM file of the CA that signed a private wss:// relay's certificate",
)
@click.option(
    "--adapter",
    "adapter_names",
    multiple=True,
    metavar="NAME",
    help="enable this installed adapter (repeatable; 'branchline adapters list')",
)
@json_option
def node_init(
    home: Path,
    dataset: str,
    node_name: str,
    schema: str,
    relay: str | None,
    token: str | None,
    ca: Path | None,
    adapter_names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a node home of DATASET with node id NODE."""
    if (relay is None) != (token is None):
        raise UserError("--relay and --token go together: give both or neither")
    if relay is not None and not relay_url_ok(relay):
        raise UserError(f"--relay {relay!r}: expected a ws:// or wss:// URL")
    if ca is not None and relay is None:
        raise UserError("--ca goes with --relay: it names the CA of that relay's certificate")
    created = Node.create(
        home,
        dataset=dataset,
        node=node_name,
        schema=schema,
        relay=relay,
        token=token,
        relay_ca=ca,
        adapters=list(adapter_names),
    )
    with contextlib.closing(created):
        info = {
            "home": str(home),
            "dataset": created.dataset,
            "node": created.node_id,
            "schema": created.schema.name,
            "schema_version": created.schema.version,
            "relay": relay,
            "adapters": sorted(created.adapters()),
        }
    if as_json:
        _emit(info)
        return
    _console().print(
        Text(
            f"created node '{created.node_id}' of dataset '{created.dataset}' in {home} "
            f"(schema {created.schema.name} v{created.schema.version})"
        )
    )


@node.command("config")
@home_option
@click.option(
    "--relay",
    default=None,
    help="new relay URL (ws:// or wss://), or several comma-separated (failover)",
)
@click.option("--token", default=None, help="new token of this node ('branchline relay enroll')")
@click.option(
    "--ca",
    "ca",
    default=None,
    help="PEM file of the CA of a private wss:// relay's certificate ('' for the system's CAs)",
)
@json_option
def node_config(
    home: Path, relay: str | None, token: str | None, ca: str | None, as_json: bool
) -> None:
    """Change the relay URL, the token or the relay's CA of an existing node
    home (a lost or rotated token, a moved relay, a private CA). A running
    'node run' picks them up."""
    with _opened(home) as n:
        n.configure(relay=relay, token=token, ca=ca)
        meta = n.store.meta()
        known = n.numbering_known()
    info = {
        "home": str(home),
        "relay": meta.get("relay"),
        "token_changed": token is not None,
        "relay_ca": meta.get(META_RELAY_CA),
        "numbering_known": known,
    }
    if as_json:
        _emit(info)
        return
    done = [f"relay {info['relay']}"] if relay is not None else []
    done += ["token replaced"] if token is not None else []
    if ca is not None:
        done += [f"relay CA {info['relay_ca']}" if ca else "relay CA: the system's"]
    _console().print(
        Text(f"{', '.join(done)}; a running 'node run' uses them at its next connection")
    )


@node.command("recover")
@home_option
@click.option(
    "--from",
    "export",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="the node's last export (full or --unsynced) to import into the fresh store",
)
@click.option("--dataset", default=None, help="dataset, when the damaged store cannot tell")
@click.option("--node", "node_name", default=None, help="node id, when the store cannot tell")
@click.option("--relay", default=None, help="relay URL, when the store cannot tell")
@click.option("--token", default=None, help="this node's token, when the store cannot tell")
@json_option
def node_recover(
    home: Path,
    export: Path | None,
    dataset: str | None,
    node_name: str | None,
    relay: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Replace a damaged node store: keep the damaged file aside under a
    dated name, create a fresh store for the same node and import the
    export given with --from (with its voucher series state). Without
    --from, the fresh store gets everything back from the relay at its
    first sync. Refuses a healthy store."""
    from .recovery import recover

    if relay is not None and not relay_url_ok(relay):
        raise UserError(f"--relay {relay!r}: expected a ws:// or wss:// URL")
    done = recover(home, export=export, dataset=dataset, node=node_name, relay=relay, token=token)
    report = done.imported
    info = {
        "home": str(home),
        "damage": done.damage,
        "damaged_file": str(done.moved_to),
        "dataset": done.dataset,
        "node": done.node,
        "identity_from": done.identity_from,
        "relay": done.relay,
        "from": str(export) if export else None,
        "records_imported": report.records if report else 0,
        "series_state_restored": report.series if report else 0,
        "numbering_known": False,
    }
    if as_json:
        _emit(info)
        return
    lines = [
        f"the store {done.damage}: kept aside as {done.moved_to}",
        f"created a fresh store for node '{done.node}' of dataset '{done.dataset}' in {home}",
    ]
    if report is not None:
        lines.append(
            f"imported {export} from node '{done.export_node}': "
            f"{_count(report.records, 'record')}, "
            f"{_count(report.series, 'series state row')} restored"
        )
    nxt = (
        f"run 'branchline sync --home {home}'"
        if done.relay
        else f"give it a relay ('branchline node config --home {home} --relay URL "
        "--token T') and sync"
    )
    lines.append(f"voucher numbers are provisional until the first completed sync: {nxt}")
    for line in lines:
        _console().print(Text(line))


@cli.command()
@home_option
@click.argument("collection")
@click.argument("fields_json", metavar="JSON")
@json_always_option
def put(home: Path, collection: str, fields_json: str, as_json: bool) -> None:
    """Create a record, or update the one whose unique key (or id) JSON names.

    An update changes only the fields given. JSON '-' reads stdin.
    Prints {"id": ...}.
    """
    fields = parse_fields(fields_json)
    with _opened(home) as n:
        rid = n.put(collection, fields)
    _emit({"id": rid})


@cli.command()
@home_option
@click.argument("voucher_type", metavar="TYPE")
@click.argument("fields_json", metavar="JSON")
@json_always_option
def voucher(home: Path, voucher_type: str, fields_json: str, as_json: bool) -> None:
    """Book a voucher of TYPE with the next number of its series.

    JSON '-' reads stdin. Prints {"id": ..., "number": ..., "provisional": ...}.
    """
    fields = parse_fields(fields_json)
    with _opened(home) as n:
        posted = n.post_voucher(voucher_type, fields)
    _emit({"id": posted.id, "number": posted.number, "provisional": posted.provisional})


@cli.command()
@home_option
@click.argument("collection")
@click.argument("id_or_key", metavar="ID_OR_KEY")
@json_always_option
def delete(home: Path, collection: str, id_or_key: str, as_json: bool) -> None:
    """Delete a live record by id (or unique key). Prints {"id": ...}."""
    with _opened(home) as n:
        rid = n.delete(collection, _full_record_id(n, collection, id_or_key))
    _emit({"id": rid})


@cli.command("get")
@home_option
@click.argument("collection")
@click.argument("id_or_key", metavar="ID_OR_KEY")
@json_option
def get_cmd(home: Path, collection: str, id_or_key: str, as_json: bool) -> None:
    """Show one live record by id or unique key (references as codes)."""
    with _opened(home) as n:
        coll = n.collection(collection)
        record = n.get(collection, _full_record_id(n, collection, id_or_key), codes=True)
    if record is None:
        raise RecordNotFound(f"{collection}: no live record with id or {coll.key} {id_or_key!r}")
    if as_json:
        _emit(record)
        return
    table = Table(title=f"{collection} {id_or_key}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in record.items():
        table.add_row(Text(name), Text(_show(value)))
    _console().print(table)


@cli.command("list")
@home_option
@click.argument("collection")
@json_option
def list_cmd(home: Path, collection: str, as_json: bool) -> None:
    """List the live records of COLLECTION (references as codes)."""
    with _opened(home) as n:
        coll = n.collection(collection)
        records = n.list(collection, codes=True)
    if as_json:
        _emit(records)
        return
    table = Table(title=f"{collection} ({_count(len(records), 'record')})")
    table.add_column("id", no_wrap=True)
    names = [*coll.fields]
    for name in names:
        table.add_column(name, overflow="fold")
    for rec in records:
        table.add_row(Text(rec["id"]), *(Text(_show(rec.get(name))) for name in names))
    _console().print(table)


@cli.command()
@home_option
@click.option("--resolved", is_flag=True, help="list the journal of resolutions instead")
@json_option
def conflicts(home: Path, resolved: bool, as_json: bool) -> None:
    """List open conflicts (duplicate keys, concurrent edits, edit vs delete,
    dangling references), or with --resolved how they were resolved."""
    with _opened(home) as n:
        found = n.conflicts(resolved=resolved)
    if as_json:
        _emit(found)
        return
    if resolved:
        _print_resolutions(found)
        return
    if not found:
        _console().print("no conflicts")
        return
    table = Table(title=_count(len(found), "conflict"))
    for name in ("id", "kind", "records", "field", "values (in force first)"):
        table.add_column(name, overflow="fold")
    with _opened(home) as n:
        labels = [_record_labels(n, c["collection"], c["records"]) for c in found]
    short = short_ids(c["id"] for c in found)
    for c, shown in zip(found, labels, strict=True):
        # A duplicate key's competitors are its records: shown as above.
        label = dict(zip(c["records"], shown, strict=True))
        values = "\n".join(
            f"{'*' if v['in_force'] else ' '} {v['node']}: "
            + (label[v["value"]] if isinstance(v["value"], str) and v["value"] in label
               else _show(v["value"]))
            for v in c["values"]
        )  # fmt: skip
        table.add_row(
            Text(short[c["id"]]),
            Text(c["kind"]),
            Text(f"{c['collection']} " + ", ".join(shown)),
            Text(c["field"]),
            Text(values),
        )
    console = _console()
    console.print(table)
    for c in found:
        console.print(Text(f"- {short[c['id']]}: {c['explanation']}"))


def _print_resolutions(entries: list[dict[str, Any]]) -> None:
    if not entries:
        _console().print("no resolutions")
        return
    table = Table(title=_count(len(entries), "resolution"))
    for name in ("when", "node", "kind", "record", "action", "old → new", "how"):
        table.add_column(name, overflow="fold")
    for e in entries:
        table.add_row(
            Text(_when(int(e.get("at", 0)))),
            Text(str(e.get("node"))),
            Text(str(e.get("kind"))),
            Text(f"{e.get('collection')} {e.get('record')}"),
            Text(str(e.get("action"))),
            Text(f"{_show(e.get('old'))} → {_show(e.get('new'))}"),
            Text("automatic" if e.get("auto") else "by hand"),
        )
    _console().print(table)


@cli.command("resolve")
@home_option
@click.argument("conflict_id", metavar="CONFLICT_ID")
@click.option(
    "--keep",
    default=None,
    help="a competing node's value, 'in_force', or a value; for edit vs delete: 'delete' or 'edit'",
)
@click.option(
    "--rename",
    default=None,
    metavar="NEW_CODE",
    help="duplicate key: give the later record (or --record) this key",
)
@click.option(
    "--merge-into",
    "merge_into",
    default=None,
    metavar="RECORD_ID",
    help="duplicate key: make the others aliases of this record",
)
@click.option(
    "--renumber",
    is_flag=True,
    help="duplicate voucher number: fresh numbers for the"
    " later vouchers (or --record) from this node's series",
)
@click.option(
    "--record",
    default=None,
    metavar="RECORD_ID",
    help="with --rename or --renumber: which losing record",
)
@json_option
def resolve_cmd(
    home: Path,
    conflict_id: str,
    keep: str | None,
    rename: str | None,
    merge_into: str | None,
    renumber: bool,
    record: str | None,
    as_json: bool,
) -> None:
    """Resolve conflict CONFLICT_ID (from 'branchline conflicts'; a unique
    prefix will do, as for every id) on every node."""
    with _opened(home) as n:
        open_ = {c["id"]: c for c in n.conflicts()}
        conflict_id = match_prefix(conflict_id, open_, "conflict id") or conflict_id
        if conflict_id in open_:
            coll = open_[conflict_id]["collection"]
            if record is not None:
                record = _full_record_id(n, coll, record)
            if merge_into is not None:
                merge_into = _full_record_id(n, coll, merge_into)
        entry = n.resolve(
            conflict_id,
            keep=keep,
            rename=rename,
            merge_into=merge_into,
            renumber=renumber,
            record=record,
        )
    if as_json:
        _emit(entry)
        return
    _console().print(
        Text(
            f"resolved {entry['kind']} {conflict_id}: {entry['action']} on "
            f"{entry['collection']} {entry['record']} ({_show(entry['old'])} → "
            f"{_show(entry['new'])}); it reaches the other nodes at the next sync"
        )
    )


@cli.command("export")
@home_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--since-state",
    "since_state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="state file of the receiving node ('branchline state'): export only what it lacks",
)
@click.option(
    "--unsynced",
    is_flag=True,
    help="only local work the relay has not acknowledged (to carry to a re-created node)",
)
@json_option
def export_cmd(
    home: Path, file: Path, since_state: Path | None, unsynced: bool, as_json: bool
) -> None:
    """Write this node's CRDT updates to an export FILE (atomically)."""
    with _opened(home) as n:
        done = export_to_file(
            n, file, created_ms=_now_ms(), since_state=since_state, unsynced=unsynced
        )
        dataset, node_id = n.dataset, n.node_id
    if as_json:
        _emit(
            {
                "file": str(file),
                "dataset": dataset,
                "node": node_id,
                "documents": done.documents,
                "bytes": done.bytes,
                "since_state_of": done.since_node,
                "unsynced": unsynced,
            }
        )
        return
    since = f" (what node '{done.since_node}' lacks)" if done.since_node else ""
    if unsynced:
        since = " of unsynced work"
    _console().print(
        Text(f"exported {_count(done.documents, 'document')}{since}, {done.bytes} bytes, to {file}")
    )


@cli.command("import")
@home_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def import_cmd(home: Path, file: Path, as_json: bool) -> None:
    """Integrate an export FILE of the same dataset (importing twice changes nothing)."""
    with _opened(home) as n:
        done = import_from_file(n, file)
    header, report = done.header, done.report
    in_file = len(header.documents)
    if as_json:
        _emit(
            {
                "file": str(file),
                "dataset": header.dataset,
                "from_node": header.node,
                "documents_in_file": in_file,
                "documents_changed": report.documents,
                "records_changed": report.records,
                "records_waiting": report.waiting,
                "series_state_restored": report.series,
                "changed": report.documents > 0,
                "unsynced": header.unsynced,
            }
        )
        return
    if report.documents == 0:
        text = (
            f"nothing new in {file} (from node '{header.node}'): "
            f"all {_count(in_file, 'document')} were already here"
        )
    else:
        text = (
            f"imported {file} from node '{header.node}': {report.documents} of "
            f"{_count(in_file, 'document')} changed, {_count(report.records, 'record')} updated"
        )
        if report.waiting:
            text += (
                f" ({report.waiting} waiting for records they refer to: "
                f"see 'branchline waiting --home {home}')"
            )
        if header.unsynced:
            text += "; this unsynced work uploads at the next sync"
    _console().print(Text(text))


@cli.command("state")
@home_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def state_cmd(home: Path, file: Path, as_json: bool) -> None:
    """Write this node's state to FILE, for another node's 'export --since-state'."""
    with _opened(home) as n:
        done = save_state(n, file, created_ms=_now_ms())
        dataset, node_id = n.dataset, n.node_id
    if as_json:
        _emit(
            {
                "file": str(file),
                "dataset": dataset,
                "node": node_id,
                "documents": done.documents,
                "bytes": done.bytes,
            }
        )
        return
    _console().print(
        Text(
            f"wrote the state of node '{node_id}' ({_count(done.documents, 'document')}, "
            f"{done.bytes} bytes) to {file}"
        )
    )


# -- sync (issue 3: node run, sync, node offline/online, status) ------------


@node.command("run")
@home_option
@sync_loop_options
def node_run(
    home: Path, backoff_max: float, verbose: bool, log_format: str, allow_shared: bool
) -> None:
    """Keep this node synced with its relay until Ctrl-C (exit 130) or
    SIGTERM (exit 0).

    Connects, syncs, ships local writes (also other processes') live and
    reconnects with capped exponential backoff; logs state changes on stderr
    (and, while the relay cannot be reached, a summary every 5 minutes).
    """
    _private_home(home, allow_shared)
    configure_logging(verbose=verbose, log_format=log_format)
    with _opened(home) as n:
        _run_live(n, backoff_max)


def _run_live(
    n: Node, backoff_max: float, watch: Callable[[], BaseException | None] | None = None
) -> None:
    """Sync ``n`` live until Ctrl-C (exit 130) or SIGTERM; with ``watch``,
    also until it returns an error (raised here), checked twice a second."""
    import asyncio
    import signal

    from .transport import Backoff, LiveSync

    stopped_by: list[int] = []
    failed: list[BaseException] = []

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if sig == signal.SIGINT:
                # A second Ctrl-C ends the process at once.
                exit_soon(SIGINT_EXIT, 0 if stopped_by else STOP_GRACE_S)
            stopped_by.append(sig)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        async with LiveSync(n, backoff=Backoff(cap_s=backoff_max)):
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5 if watch else None)
                error = watch() if watch else None
                if error is not None:
                    failed.append(error)
                    return

    asyncio.run(run())
    if failed:
        raise failed[0]
    if stopped_by and stopped_by[0] == signal.SIGINT:
        raise click.exceptions.Exit(SIGINT_EXIT)


@node.command("serve")
@home_option
@click.option(
    "--listen",
    default="127.0.0.1:8470",
    show_default=True,
    metavar="HOST:PORT",
    help="address to serve on (loopback unless --public)",
)
@click.option(
    "--public",
    is_flag=True,
    help="allow a non-loopback --listen address (put TLS in front, or give --tls-cert/--tls-key)",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="PEM certificate: serve HTTPS",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="PEM private key of --tls-cert",
)
@sync_loop_options
def node_serve(
    home: Path,
    listen: str,
    public: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    backoff_max: float,
    verbose: bool,
    log_format: str,
    allow_shared: bool,
) -> None:
    """Serve the branch server (JSON API, web screen, /metrics) for this
    node's workstations, and keep the node synced like 'node run', until
    Ctrl-C (exit 130) or SIGTERM (exit 0). Users and their tokens: 'branchline
    node users'.
    """
    import signal

    from .server.serve import parse_listen, serve

    host, port = parse_listen(listen)
    Node.open(home).close()  # a missing home fails here, in one line
    _private_home(home, allow_shared)
    stopped_by = serve(
        home,
        host,
        port,
        public=public,
        tls_cert=tls_cert,
        tls_key=tls_key,
        backoff_max=backoff_max,
        verbose=verbose,
        log_format=log_format,
    )
    if stopped_by == signal.SIGINT:
        raise click.exceptions.Exit(SIGINT_EXIT)


@node.group("users")
def node_users() -> None:
    """Workstation users of the branch server ('node serve') and their tokens."""


@node_users.command("add")
@home_option
@click.argument("name")
@click.option("--read-only", is_flag=True, help="the user can read, not write")
@json_option
def node_users_add(home: Path, name: str, read_only: bool, as_json: bool) -> None:
    """Add user NAME and print its token, once: it is stored only hashed."""
    from .users import add_user

    with _opened(home) as n:
        token = add_user(n, name, read_only=read_only, now_ms=_now_ms())
    if as_json:
        _emit({"user": name, "read_only": read_only, "token": token})
        return
    click.echo(token)
    kind = "read-only user" if read_only else "user"
    click.echo(
        f"added {kind} '{name}'; the line above is its token, shown only now: give it to "
        "the workstation (the web screen asks for it)",
        err=True,
    )


@node_users.command("list")
@home_option
@json_option
def node_users_list(home: Path, as_json: bool) -> None:
    """List the users (never their tokens)."""
    from .users import list_users

    with _opened(home) as n:
        users = list_users(n)
    rows: list[dict[str, Any]] = [
        {"user": u.name, "read_only": u.read_only, "created_at": u.created_at} for u in users
    ]
    if as_json:
        _emit(rows)
        return
    if not rows:
        _console().print("no users; add one with 'branchline node users add NAME'")
        return
    table = Table(title=_count(len(rows), "user"))
    for name in ("user", "access", "created"):
        table.add_column(name)
    for r in rows:
        table.add_row(
            Text(r["user"]),
            Text("read-only" if r["read_only"] else "read and write"),
            Text(_when(r["created_at"])),
        )
    _console().print(table)


@node_users.command("remove")
@home_option
@click.argument("name")
def node_users_remove(home: Path, name: str) -> None:
    """Remove user NAME: its token stops working (a running server notices
    within a second)."""
    from .users import remove_user

    with _opened(home) as n:
        remove_user(n, name)
    click.echo(f"removed user '{name}'")


@node.command("offline")
@home_option
@json_option
def node_offline(home: Path, as_json: bool) -> None:
    """Explicit offline mode: a running 'node run' stops connecting."""
    _offline_mode(home, True, as_json)


@node.command("online")
@home_option
@json_option
def node_online(home: Path, as_json: bool) -> None:
    """Leave offline mode: a running 'node run' connects again."""
    _offline_mode(home, False, as_json)


def _offline_mode(home: Path, offline: bool, as_json: bool) -> None:
    from .transport import set_offline

    with _opened(home) as n:
        set_offline(n, offline)
    if as_json:
        _emit({"home": str(home), "offline_mode": offline})
    elif offline:
        click.echo(f"node is in offline mode; 'branchline node online --home {home}' to reconnect")
    else:
        click.echo("node may connect again")


@cli.command("sync")
@home_option
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 86_400),
    default=60.0,
    show_default=True,
    help="seconds to reach a full sync before giving up",
)
@json_option
@shared_home_option
def sync_cmd(home: Path, timeout: float, as_json: bool, allow_shared: bool) -> None:
    """Sync once: push all, pull all; exit 0 only when fully synced.

    Shows a progress bar per collection (records) when stdout is a terminal.
    Changes the relay refuses are set aside and the rest goes on; they are
    listed by 'branchline failures' and the exit code is then 1.
    """
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .errors import SyncIncomplete
    from .transport import node_sync

    _private_home(home, allow_shared)
    console = _console()
    with _opened(home) as n:
        if console.is_terminal and not as_json:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("records"),
            )
            with Progress(*columns, console=console, transient=False) as bars:
                tasks: dict[str, Any] = {}

                def progress(collection: str, done: int, total: int) -> None:
                    if collection not in tasks:
                        tasks[collection] = bars.add_task(collection, total=total)
                    bars.update(tasks[collection], completed=done, total=total)

                driver = asyncio.run(node_sync(n, timeout=timeout, on_progress=progress))
        else:
            driver = asyncio.run(node_sync(n, timeout=timeout))
        pending = sum(n.pending().values())
    failures = driver.failures or {"upload": 0, "download": 0}
    result = {
        "synced": not any(failures.values()),
        "received": driver.stats.imported,
        "acknowledged": driver.stats.acked_rows,
        "download_failures": driver.stats.download_failures,
        "pending": pending,
        "failures": failures,
    }
    if as_json:
        _emit(result)
    else:
        console.print(
            Text(
                f"{'synced' if result['synced'] else 'synced the rest'}: "
                f"{_count(driver.stats.imported, 'update')} received, "
                f"{_count(driver.stats.acked_rows, 'local change')} acknowledged"
            )
        )
    if not result["synced"]:
        raise SyncIncomplete(
            f"{failures['upload']} failed to go up and {failures['download']} failed to "
            f"come down; see 'branchline failures --home {home}', then 'branchline retry'"
        )


# -- sync failures (issue 4): failures, retry ---------------------------------


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def _short_when(ms: int) -> str:
    """``2026-12-03 12:05`` (UTC), for table cells."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")


@cli.command("failures")
@home_option
@json_option
def failures_cmd(home: Path, as_json: bool) -> None:
    """Sync failures that wait for a person: what failed to go up or to come
    down, the records, the reason, first and last attempt, attempts.

    Local changes of a document that failed to go up stay in the outbox
    ('held') while every other document keeps syncing; 'branchline retry'
    tries again.
    """
    from .sync import list_failures

    with _opened(home) as n:
        items = list_failures(n)
        captured = n.capture_failures()
    if as_json:
        _emit(
            [f.to_json() for f in items]
            + [{"direction": "capture", **f.to_json()} for f in captured]
        )
        return
    console = _console()
    if captured:
        _print_capture_failures(console, captured)
    if not items:
        console.print(Text("no sync failures"))
        return
    table = Table(title=_count(len(items), "sync failure"))
    # The reasons, long sentences, follow the table at full width.
    for name in ("id", "failed to", "document", "records", "attempts", "last"):
        table.add_column(name, overflow="fold", no_wrap=name in ("id", "attempts", "last"))
    with _opened(home) as n:
        labels = [
            _record_labels(n, f.collection, f.records[:3]) if f.collection else f.records[:3]
            for f in items
        ]
    for f, first in zip(items, labels, strict=True):
        what = "go up" if f.direction == "upload" else "come down"
        if f.held:
            what += f" ({f.held} held)"
        if f.retrying:
            what += ", retry asked"
        shown = ", ".join(first) + (f" +{len(f.records) - 3}" if len(f.records) > 3 else "")
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    str(f.id),
                    what,
                    f.doc,
                    shown,
                    str(f.attempts),
                    _short_when(f.last_at),
                )
            )
        )
    console.print(table)
    for f in items:
        console.print(Text(f"- {f.id}: {f.reason}"))


def _print_capture_failures(console: Console, captured: list[Any]) -> None:
    table = Table(title=_count(len(captured), "quarantined change") + " of captured tables")
    for name in ("id", "table", "change", "row", "key", "since"):
        table.add_column(name, overflow="fold")
    for f in captured:
        c = f.change
        key = c.old_key if c.op == "delete" else c.new_key
        table.add_row(
            *(
                Text(v)
                for v in (
                    str(f.id),
                    c.table,
                    c.op,
                    str(c.row),
                    _show(key),
                    _short_when(f.failed_at),
                )
            )
        )
    console.print(table)
    for f in captured:
        console.print(Text(f"- {f.id}: {f.reason}"))
    console.print(Text("fix the row (or what it refers to), then 'branchline capture retry'"))


@cli.command("retry")
@home_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "all_", is_flag=True, help="retry every listed failure")
@json_option
def retry_cmd(home: Path, ids: tuple[int, ...], all_: bool, as_json: bool) -> None:
    """Try sync failures again (IDs from 'branchline failures', or --all).

    A running 'node run' picks them up within a second; otherwise the next
    'branchline sync' does. A failure that fails again is held again.
    """
    from .sync import retry

    if bool(ids) == all_:
        raise UserError("give either the failure ids to retry or --all (see 'branchline failures')")
    with _opened(home) as n:
        marked = retry(n, None if all_ else ids)
    if as_json:
        _emit({"retrying": [f.id for f in marked]})
        return
    docs = ", ".join(sorted({f.doc for f in marked})) or "nothing"
    _console().print(
        Text(
            f"will retry {_count(len(marked), 'failure')} ({docs}); a running 'node run' "
            "picks them up within a second, else run 'branchline sync'"
        )
    )


@cli.command("status")
@home_option
@json_option
def status_cmd(home: Path, as_json: bool) -> None:
    """Sync status: online, last sync, when the relay was last reached and the
    last sync error, pending changes, conflicts, failures."""
    from .status import node_status

    with _opened(home) as n:
        info = node_status(n, _now_ms())
    if as_json:
        _emit(info)
        return
    table = Table(title=f"node '{info['node']}' of dataset '{info['dataset']}'", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    when = (
        dt.datetime.fromtimestamp(info["last_sync"] / 1000, dt.UTC).isoformat(timespec="seconds")
        if info["last_sync"]
        else "never"
    )
    pending = {k: v for k, v in info["pending"].items() if v}
    urgent = {k: v for k, v in info["urgent_pending"].items() if v}
    rows = [
        ("online", _show(info["online"]) + f" ({info['state']})"),
        ("offline mode", _show(info["offline_mode"])),
        ("relay", info["relay"] or "none"),
        ("last sync", when),
        ("relay reached", _when(info["last_reached"]) if info["last_reached"] else "never"),
        ("pending", _show(pending) if pending else "nothing"),
        ("urgent pending", f"{_show(urgent)} (they sync first)" if urgent else "none"),
        ("waiting", f"{info['waiting']} (see 'branchline waiting')" if info["waiting"] else "none"),
        ("conflicts", str(info["conflicts"])),
        (
            "failures",
            f"upload {info['failures']['upload']}, download {info['failures']['download']}",
        ),
    ]
    if info["capture"]["tables"]:
        cap = info["capture"]
        rows.append(
            (
                "captured tables",
                f"{cap['tables']}: {cap['queued']} changes queued, "
                f"{cap['quarantined']} quarantined",
            )
        )
    error = info["last_error"]
    if error:
        rows.insert(5, ("last error", f"{error['message']} (since {_when(error['at'])})"))
    refused = info["token_refused"]
    if refused:
        rows.append(
            (
                "relay token",
                f"token refused by the relay ({_when(refused['at'])}): enroll the node again "
                "('branchline relay enroll') and run 'branchline node config --home "
                f"{home} --token T'",
            )
        )
    if not info["numbering_known"]:
        rows.append(("numbering", "provisional until the first completed sync (rebuilt home)"))
    for name, value in rows:
        table.add_row(Text(name), Text(value))
    _console().print(table)


@cli.command("waiting")
@home_option
@json_option
def waiting_cmd(home: Path, as_json: bool) -> None:
    """Received or imported records that wait for a record they refer to
    (shown once it arrives, or as a dangling reference after a full sync)."""
    with _opened(home) as n:
        found = n.waiting_records()
    if as_json:
        _emit(found)
        return
    if not found:
        _console().print("nothing waits")
        return
    table = Table(title=_count(len(found), "waiting record"))
    for name in ("collection", "code / number", "id", "waits for"):
        table.add_column(name, overflow="fold")
    for r in found:
        missing = ", ".join(f"{m['collection']} {m['id']}" for m in r["missing"])
        table.add_row(
            Text(r["collection"]), Text(str(r["key"] or "")), Text(r["id"]), Text(missing)
        )
    _console().print(table)


# -- adapters (issue 5: rebuild, query, adapters, bridge) ---------------------


@cli.command("rebuild")
@home_option
@click.option("--adapter", "names", multiple=True, help="rebuild only this adapter (repeatable)")
@json_option
def rebuild_cmd(home: Path, names: tuple[str, ...], as_json: bool) -> None:
    """Rebuild adapter tables from the records and report what differed.

    The incremental tables should equal the rebuild: any difference is
    listed and the exit code is 1. One transaction: safe to interrupt.
    """
    with _opened(home) as n:
        reports = n.rebuild_adapters(names or None)
    differing = [t for r in reports for t in r.tables if not t.same]
    if as_json:
        _emit(
            [
                {
                    "adapter": r.adapter,
                    "records": r.records,
                    "seconds": round(r.seconds, 3),
                    "same": r.same,
                    "tables": [
                        {
                            "table": t.table,
                            "rows": t.rows,
                            "missing": t.missing,
                            "extra": t.extra,
                            "samples": t.samples,
                        }
                        for t in r.tables
                    ],
                }
                for r in reports
            ]
        )
    else:
        console = _console()
        if not reports:
            console.print("no adapters enabled; nothing to rebuild")
        for r in reports:
            verdict = "identical to the incremental tables" if r.same else "DIFFERED"
            rows = sum(t.rows for t in r.tables)
            console.print(
                Text(
                    f"{r.adapter}: rebuilt {_count(len(r.tables), 'table')} "
                    f"({_count(rows, 'row')}) from {_count(r.records, 'record')} "
                    f"in {r.seconds:.2f} s: {verdict}"
                )
            )
            for t in r.tables:
                if not t.same:
                    console.print(Text(f"  {t.table}: {t.missing} missing, {t.extra} extra rows"))
                    for sample in t.samples:
                        console.print(Text(f"    {sample}"))
    if differing:
        raise click.exceptions.Exit(1)


@cli.command("query")
@home_option
@click.argument("sql")
@json_option
def query_cmd(home: Path, sql: str, as_json: bool) -> None:
    """Run one read-only SQL statement on the node's tables and views.

    Writes are refused (exit 2). --json prints a list of row objects;
    decimals in the books' views are exact text.
    """
    with _opened(home) as n:
        result = n.query(sql)
    if as_json:
        _emit([{k: json_cell(v) for k, v in row.items()} for row in result.objects()])
        return
    table = Table(title=_count(len(result.rows), "row"))
    for name in result.columns:
        table.add_column(name, overflow="fold")
    for row in result.rows:
        table.add_row(*(Text("" if v is None else str(json_cell(v))) for v in row))
    _console().print(table)


@cli.group("series")
def series_group() -> None:
    """Voucher number series: the gap journal."""


@series_group.command("gaps")
@home_option
@click.option("--series", "series", metavar="S", help="one voucher book, or one series key")
@json_option
def series_gaps(home: Path, series: str | None, as_json: bool) -> None:
    """List the numbers voided (or restored) on any node, from the
    replicated gap journal: series, number, reason, voucher, node, when."""
    with _opened(home) as n:
        rows = n.gaps(series)
    if as_json:
        _emit(rows)
        return
    if not rows:
        click.echo("no gaps" + (f" in {series}" if series else ""))
        return
    table = Table(title="number gaps")
    for column in ("series", "number", "reason", "voucher", "node", "when"):
        table.add_column(column, overflow="fold")
    for r in rows:
        cells = (r["series"], r["number"], r["reason"], r["voucher"] or "-", r["node"], r["at"])
        table.add_row(*(Text(str(c)) for c in cells))
    _console().print(table)


@cli.group("adapters")
def adapters_group() -> None:
    """Enable, disable and list a node's adapters (SQL tables kept from its records)."""


@adapters_group.command("list")
@home_option
@json_option
def adapters_list(home: Path, as_json: bool) -> None:
    """Installed adapters, and which this node enables."""
    from .plugins import installed

    with _opened(home) as n:
        on = n.adapters()
    rows = [
        {"adapter": name, "enabled": name in on, "options": on.get(name), "source": ep.value}
        for name, ep in sorted(installed().items())
    ]
    if as_json:
        _emit(rows)
        return
    table = Table(title="adapters")
    for name in ("adapter", "enabled", "options", "source"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(
            Text(r["adapter"]),
            Text(_show(r["enabled"])),
            Text(_show(r["options"] or "")),
            Text(r["source"]),
        )
    _console().print(table)


@adapters_group.command("enable")
@home_option
@click.argument("name")
@click.option(
    "--options",
    "options_json",
    default=None,
    metavar="JSON",
    help='adapter options as a JSON object, e.g. \'{"collections": ["tasks"]}\'',
)
@json_option
def adapters_enable(home: Path, name: str, options_json: str | None, as_json: bool) -> None:
    """Enable adapter NAME and fill its tables from the current records."""
    options = parse_fields(options_json) if options_json else {}
    with _opened(home) as n:
        n.enable_adapter(name, options)
    if as_json:
        _emit({"adapter": name, "enabled": True, "options": options})
        return
    click.echo(f"adapter '{name}' enabled; its tables are filled from the current records")


@adapters_group.command("disable")
@home_option
@click.argument("name")
@json_option
def adapters_disable(home: Path, name: str, as_json: bool) -> None:
    """Disable adapter NAME and drop its tables."""
    with _opened(home) as n:
        n.disable_adapter(name)
    if as_json:
        _emit({"adapter": name, "enabled": False})
        return
    click.echo(f"adapter '{name}' disabled; its tables are dropped")


@cli.group("capture")
def capture_group() -> None:
    """Replicate an app's own SQL table: its writes become records, other
    nodes' changes are written into it (docs/capture.md)."""


def _drain_all(n: Node, quiet: bool) -> tuple[int, int]:
    """Write every queued change, batch by batch, saying how far it got."""
    written = quarantined = 0
    total = n.capture_status()["queued"]
    while True:
        done = n.drain_captured()
        if not done.changes:
            return written, quarantined
        written += done.written
        quarantined += done.quarantined
        if not quiet and total > 5 * done.changes:
            click.echo(f"  {written + quarantined} of {total} changes written", err=True)


def _drained_text(written: int, quarantined: int) -> str:
    text = f"{_count(written, 'change')} written"
    if quarantined:
        text += f", {quarantined} quarantined (see 'branchline failures')"
    return text


@capture_group.command("enable")
@home_option
@click.argument("table")
@click.option("--collection", required=True, help="the collection the table's rows are records of")
@click.option(
    "--key",
    default=None,
    metavar="COLUMN",
    help="the column holding the collection's key (default: a column of the key's name)",
)
@json_option
def capture_enable(home: Path, table: str, collection: str, key: str | None, as_json: bool) -> None:
    """Capture TABLE (a table of the node store the app writes): its rows
    become records of the collection, other nodes' changes are written in."""
    with _opened(home) as n:
        queued = n.enable_capture(table, collection, key)
        spec = n.captures()[table]
        written, quarantined = _drain_all(n, as_json)
    if as_json:
        _emit({**spec.to_json(), "queued": queued, "written": written, "quarantined": quarantined})
        return
    click.echo(
        f"capturing {table} into {collection} (key column {spec.key}; columns "
        f"{', '.join(spec.columns.values())}); its {_count(queued, 'existing row')}: "
        + _drained_text(written, quarantined)
    )


@capture_group.command("disable")
@home_option
@click.argument("table")
@click.option("--discard-failures", is_flag=True, help="give up the table's quarantined changes")
@json_option
def capture_disable(home: Path, table: str, discard_failures: bool, as_json: bool) -> None:
    """Stop capturing TABLE (its queued changes are written first; the table stays)."""
    with _opened(home) as n:
        n.disable_capture(table, discard_failures=discard_failures)
    if as_json:
        _emit({"table": table, "captured": False})
        return
    click.echo(f"{table} is no longer captured; the table and its rows stay as they are")


@capture_group.command("list")
@home_option
@json_option
def capture_list(home: Path, as_json: bool) -> None:
    """Captured tables: collection, key column, columns, changes queued and quarantined."""
    with _opened(home) as n:
        specs = n.captures()
        queued = n.capture_queued()
        held: dict[str, int] = {}
        for f in n.capture_failures():
            held[f.change.table] = held.get(f.change.table, 0) + 1
    rows = [
        {**s.to_json(), "queued": queued.get(t, 0), "quarantined": held.get(t, 0)}
        for t, s in specs.items()
    ]
    if as_json:
        _emit(rows)
        return
    if not rows:
        click.echo("no captured tables")
        return
    table = Table(title=_count(len(rows), "captured table"))
    for name in ("table", "collection", "key", "columns", "queued", "quarantined"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(
            *(
                Text(str(v))
                for v in (
                    r["table"],
                    r["collection"],
                    r["key"],
                    ", ".join(r["columns"].values()),
                    r["queued"],
                    r["quarantined"],
                )
            )
        )
    _console().print(table)


@capture_group.command("drain")
@home_option
@json_option
def capture_drain(home: Path, as_json: bool) -> None:
    """Write the captured changes waiting in the queue now (a running node
    does this by itself within a fraction of a second)."""
    with _opened(home) as n:
        written, quarantined = _drain_all(n, as_json)
    if as_json:
        _emit({"written": written, "quarantined": quarantined})
        return
    click.echo(_drained_text(written, quarantined))


@capture_group.command("retry")
@home_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "all_", is_flag=True, help="retry every quarantined change")
@json_option
def capture_retry(home: Path, ids: tuple[int, ...], all_: bool, as_json: bool) -> None:
    """Queue quarantined changes again (IDs from 'branchline failures', or
    --all) once their cause is fixed, and write them."""
    if bool(ids) == all_:
        raise UserError(
            "give either the quarantined change ids to retry or --all (see 'branchline failures')"
        )
    with _opened(home) as n:
        again = n.retry_captured(None if all_ else ids)
        written, quarantined = _drain_all(n, as_json)
    if as_json:
        _emit({"retried": again, "written": written, "quarantined": quarantined})
        return
    click.echo(f"{_count(again, 'change')} queued again; " + _drained_text(written, quarantined))


@cli.group("bridge")
def bridge_group() -> None:
    """Map records between two collections or node homes (adapters.bridge)."""


@bridge_group.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="bridge TOML config",
)
@click.option("--once", is_flag=True, help="one pass (until nothing is left to map), then exit")
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 3600),
    default=None,
    help="seconds between passes when live (default: the config's, else 1)",
)
@json_option
def bridge_run(config_path: Path, once: bool, interval: float | None, as_json: bool) -> None:
    """Run the bridge of --config: live until Ctrl-C or SIGTERM, or --once."""
    import importlib

    try:
        # By name: the engine never depends on the adapters package.
        bridge_mod: Any = importlib.import_module("adapters.bridge")
    except ImportError:
        raise UserError(
            "the bridge needs the 'adapters' package installed with branchline"
        ) from None
    config = bridge_mod.load_config(config_path)
    with bridge_mod.Bridge(config) as bridge:
        if once:
            report = bridge.run_once()
            if as_json:
                _emit(report.as_dict())
            else:
                click.echo(report.summary())
            return
        import signal

        stop = {"now": False}

        def halt(*_: Any) -> None:
            stop["now"] = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, halt)
        click.echo(f"bridge '{config.name}' running; Ctrl-C to stop", err=True)
        bridge.run_live(lambda: stop["now"], interval, lambda r: click.echo(r.summary(), err=True))


# -- head-office reporting (issue 13) -----------------------------------------


def _pg_books_feed() -> Any:
    import importlib

    try:
        # By name: the engine never depends on the adapters package.
        return importlib.import_module("adapters.pg_books.feed")
    except ImportError as exc:
        raise UserError(
            f"reporting needs the 'adapters' package and psycopg installed with branchline ({exc})"
        ) from None


def pg_options(fn: F) -> F:
    """--pg and --pg-schema of the report commands."""
    for option in reversed(
        (
            click.option(
                "--pg",
                "pg_url",
                required=True,
                envvar="BRANCHLINE_REPORT_PG",
                show_envvar=True,
                metavar="URL",
                help="PostgreSQL of the head-office books (postgresql://user@host:port/db)",
            ),
            click.option(
                "--pg-schema",
                default=None,
                metavar="NAME",
                help="PostgreSQL schema of the books (default: the dataset's name)",
            ),
        )
    ):
        fn = option(fn)
    return fn


@cli.group("report")
def report_group() -> None:
    """Head-office books of every branch in PostgreSQL, fed by a read-only
    reporting node (adapter pg_books)."""


@report_group.command("serve")
@home_option
@pg_options
@sync_loop_options
def report_serve(
    home: Path,
    pg_url: str,
    pg_schema: str | None,
    backoff_max: float,
    verbose: bool,
    log_format: str,
    allow_shared: bool,
) -> None:
    """Sync this reporting node like 'node run' and apply what it receives
    to the books in PostgreSQL (one transaction per batch, the position
    stored with it), until Ctrl-C (exit 130) or SIGTERM (exit 0). Builds the
    books first if the schema has none; while PostgreSQL is unreachable the
    node keeps syncing and the books catch up when it is back.
    """
    feed = _pg_books_feed()
    _private_home(home, allow_shared)
    configure_logging(verbose=verbose, log_format=log_format)
    with _opened(home) as n:
        feed.ensure_enabled(n)
        follower = feed.Follower(home, pg_url, pg_schema or n.dataset)
        follower.start()
        try:
            _run_live(n, backoff_max, watch=lambda: follower.error)
        finally:
            follower.stop()


@report_group.command("rebuild")
@home_option
@pg_options
@json_option
def report_rebuild(home: Path, pg_url: str, pg_schema: str | None, as_json: bool) -> None:
    """Rebuild the books in PostgreSQL from this reporting node's records, in
    one PostgreSQL transaction (interrupted: the books stay as they were);
    a running 'report serve' goes on from the rebuilt books."""
    feed = _pg_books_feed()
    started = time.perf_counter()
    with _opened(home) as n:
        schema = pg_schema or n.dataset
        books = feed.ReportBooks(pg_url, schema, n)
        try:
            count, upto = feed.rebuild(
                n, books, lambda c: click.echo(f"rebuild: {c:,} records", err=True)
            )
        finally:
            books.close()
    seconds = time.perf_counter() - started
    if as_json:
        _emit({"schema": schema, "records": count, "position": upto, "seconds": seconds})
    else:
        click.echo(f"rebuilt schema '{schema}' from {_count(count, 'record')} in {seconds:.1f} s")


cli.add_command(relay_group)


def main() -> None:
    """Entry point of the ``branchline`` command; exits with the command's code."""
    cli(prog_name="branchline")
