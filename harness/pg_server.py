"""A PostgreSQL server of one's own: ``initdb`` in a temporary directory,
started on a loopback port with ``pg_ctl``, for the tests and the soak that
stop and start it (a server restart) without touching the machine's own
server. As root, the programs run as the ``postgres`` user (PostgreSQL
refuses root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class PrivateServer:
    """One private server: ``init`` once, then ``start`` and ``stop`` as
    often as wanted (``running`` says which), ``remove`` at the end. Every
    method raises RuntimeError with the program's message when it fails."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="bl-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        self.running = False
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stderr.strip() or done.stdout}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip
        self.running = True

    def stop(self) -> None:
        """A fast shutdown: every session is cut, as a restart cuts them."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.running = False

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def server_bindir() -> Path | None:
    """Where PostgreSQL's server programs (initdb, pg_ctl) are, or None."""
    for found in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True):
        return found.parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None
