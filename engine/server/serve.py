"""``branchline node serve``: uvicorn serving the branch server app, whose
lifespan runs the node's live sync loop, in one event loop."""

from __future__ import annotations

import ipaddress
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from ..errors import UserError
from ..stopping import SIGINT_EXIT, STOP_GRACE_S, exit_soon
from ..transport import Backoff
from ..wslog import configure_logging
from .app import create_app

DEFAULT_LISTEN = "127.0.0.1:8470"
#: Seconds open connections (event streams) get to finish on shutdown.
GRACEFUL_S = 3
#: How long a thread holding the GIL runs before a waiting one gets it. The
#: sync's worker thread imports a catch-up in pure Python while the event loop
#: and the API thread answer workstations; at CPython's default (5 ms) every
#: hand-over of a request waits up to that long, and a ``put`` has several.
SWITCH_INTERVAL_S = 0.001


class _Server(uvicorn.Server):
    """uvicorn's server, but a signal ends it without being raised again
    (uvicorn does that after a graceful shutdown, so the process would die
    of it): the caller picks the exit code from ``stopped_by``. SIGINT ends
    the process within ``STOP_GRACE_S`` whatever still runs
    (engine.stopping)."""

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:
            exit_soon(SIGINT_EXIT, 0 if self.should_exit else STOP_GRACE_S)
            if self.should_exit:
                self.force_exit = True
        if self.stopped_by is None:
            self.stopped_by = sig
        self.should_exit = True


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port). Raises UserError."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise UserError(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"--listen {listen!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise UserError(f"--listen {listen!r}: the port must be 0 to 65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    home: Path,
    host: str,
    port: int,
    *,
    public: bool = False,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    backoff_max: float = 3.0,
    verbose: bool = False,
    log_format: str = "text",
) -> int | None:
    """Serve ``home`` on ``host:port`` until SIGINT or SIGTERM (uvicorn's
    handlers), syncing it with its relay meanwhile; returns the signal that
    stopped it. Logs as ``engine.wslog.configure_logging`` says. Raises
    UserError for a non-loopback address without ``public``, or half a TLS
    pair."""
    if not is_loopback(host) and not public:
        raise UserError(
            f"{host} is reachable from other machines: pass --public to bind it, and put "
            "TLS in front (a reverse proxy) or give --tls-cert and --tls-key"
        )
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together: give both or neither")
    configure_logging(verbose=verbose, log_format=log_format)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(home, sync=True, backoff=Backoff(cap_s=backoff_max))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_config=None,  # uvicorn's loggers go through ours (text or JSON)
        # A line per request costs about a tenth of a request's time: -v only.
        access_log=verbose,
        timeout_graceful_shutdown=GRACEFUL_S,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
    )
    server = _Server(config)
    server.run()
    return server.stopped_by
