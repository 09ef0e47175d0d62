"""websockets loggers that never keep a frame's payload.

websockets logs each frame at DEBUG as ``logger.debug("< %s", frame)``. The
formatted line shows only a truncated hex dump, but the log record keeps the
``Frame`` object, payload and all, as an argument: a handler that stores
arguments (structured logging, an error tracker) would keep the token of a
``hello`` frame. The filter installed here replaces every ``Frame`` argument
with its opcode and length before any handler sees the record.
"""

from __future__ import annotations

import logging

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
