"""Logging of the long-running commands: websockets loggers that never keep
a frame's payload, and the log setup of ``node run``/``node serve`` (text or
one JSON object per line).

websockets logs each frame at DEBUG as ``logger.debug("< %s", frame)``. The
formatted line shows only a truncated hex dump, but the log record keeps the
``Frame`` object, payload and all, as an argument: a handler that stores
arguments (structured logging, an error tracker) would keep the token of a
``hello`` frame. The filter installed here replaces every ``Frame`` argument
with its opcode and length before any handler sees the record.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

from websockets.frames import Frame


class RedactFrames(logging.Filter):
    """Replace ``Frame`` arguments of a record by ``"OPCODE [n bytes]"``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, Frame) for a in args):
            record.args = tuple(
                f"{a.opcode.name} [{len(a.data)} bytes]" if isinstance(a, Frame) else a
                for a in args
            )
        return True


def websockets_logger(name: str) -> logging.Logger:
    """The logger ``name`` with ``RedactFrames`` installed (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactFrames) for f in logger.filters):
        logger.addFilter(RedactFrames())
    return logger


# -- the log setup of 'node run' and 'node serve' -----------------------------

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
#: Loggers kept at INFO under -v: at DEBUG they log every frame and handshake line.
QUIET_UNDER_VERBOSE = ("websockets", "uvicorn.error", "asyncio")
#: LogRecord attributes that are not ``extra`` fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601 with ms), ``level``,
    ``logger``, ``message``, the record's ``extra`` fields (e.g. ``event``)
    and ``exc`` (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(*, verbose: bool, log_format: str, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at INFO, or DEBUG with ``verbose`` (but
    for websockets', uvicorn's and asyncio's loggers, which stay at INFO:
    never a line per frame), as text or one JSON object per line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_UNDER_VERBOSE:
        logging.getLogger(name).setLevel(logging.INFO)
