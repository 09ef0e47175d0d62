"""The peers the benchmark compares Branchline with, installed by the
benchmark itself under ``bench/.peers/`` (gitignored, never committed):

- ``bench/.peers/py``: a venv with pycrdt-websocket and pycrdt-store (PyPI),
  whose server ``bench/pycrdt_server.py`` runs in it;
- ``bench/.peers/node``: the y-websocket server (npm ``@y/websocket-server``)
  run by the machine's ``node``.

Each ``ensure_*`` returns a ``Peer`` that is either ready (with the command
that starts its server) or skipped with a reason that the report prints.
Installation happens once; a stamp file records what was installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .stats import ROOT

PEERS = ROOT / "bench" / ".peers"
PY_VENV = PEERS / "py"
NODE_DIR = PEERS / "node"

#: pycrdt pinned to the engine's version, so both sides run the same Yrs core.
PY_PACKAGES = (
    "pycrdt==0.14.13",
    "pycrdt-websocket==0.16.5",
    "pycrdt-store==0.1.5",
    "websockets==17.4",
)
#: @y/websocket-server 0.1.5 wants yjs 14 (``@y/y``), of which the registry has
#: only prereleases that npm will not pick for ``*``; 0.1.1 runs on yjs 13.
NPM_PACKAGES = ("@y/websocket-server@0.1.1", "yjs@13.6.33")
INSTALL_TIMEOUT_S = 600


@dataclass
class Peer:
    name: str
    ready: bool
    reason: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)


def _stamp(directory: Path, wanted: tuple[str, ...]) -> bool:
    stamp = directory / ".bench-stamp"
    return stamp.exists() and stamp.read_text(encoding="utf-8") == "\n".join(wanted)


def _write_stamp(directory: Path, wanted: tuple[str, ...]) -> None:
    (directory / ".bench-stamp").write_text("\n".join(wanted), encoding="utf-8")


def _run(cmd: list[str], cwd: Path | None = None) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def _pip_versions(python: Path) -> dict[str, str]:
    code = (
        "from importlib import metadata as m\n"
        "for n in ('pycrdt', 'pycrdt-websocket', 'pycrdt-store', 'sqlite-anyio', "
        "'anyio', 'websockets'):\n"
        "    print(n, m.version(n))\n"
    )
    ok, out = _run([str(python), "-c", code])
    if not ok:
        return {}
    return dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)


def ensure_pycrdt(install: bool = True) -> Peer:
    """pycrdt-websocket + pycrdt-store in ``bench/.peers/py``."""
    python = PY_VENV / "bin" / "python"
    script = ROOT / "bench" / "pycrdt_server.py"
    if not _stamp(PY_VENV, PY_PACKAGES):
        if not install:
            return Peer("pycrdt-websocket", False, "not installed (run without --no-install)")
        if PY_VENV.exists():
            shutil.rmtree(PY_VENV)
        PEERS.mkdir(parents=True, exist_ok=True)
        ok, out = _run([sys.executable, "-m", "venv", str(PY_VENV)])
        if ok:
            ok, out = _run([str(python), "-m", "pip", "install", "--quiet", *PY_PACKAGES])
        if not ok:
            return Peer("pycrdt-websocket", False, f"pip install failed: {out.strip()[-300:]}")
        _write_stamp(PY_VENV, PY_PACKAGES)
    return Peer(
        "pycrdt-websocket",
        True,
        versions=_pip_versions(python),
        command=[str(python), str(script)],
    )


def ensure_y_websocket(install: bool = True) -> Peer:
    """The y-websocket server from npm in ``bench/.peers/node``."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return Peer("y-websocket", False, "node/npm not on PATH")
    server = NODE_DIR / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"
    if not _stamp(NODE_DIR, NPM_PACKAGES) or not server.exists():
        if not install:
            return Peer("y-websocket", False, "not installed (run without --no-install)")
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        (NODE_DIR / "package.json").write_text(
            '{"name": "branchline-bench-peers", "private": true}\n', encoding="utf-8"
        )
        ok, out = _run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *NPM_PACKAGES],
            cwd=NODE_DIR,
        )
        if not ok or not server.exists():
            return Peer("y-websocket", False, f"npm install failed: {out.strip()[-300:]}")
        _write_stamp(NODE_DIR, NPM_PACKAGES)
    ok, version = _run([node, "--version"])
    versions = {"node": version.strip() if ok else "?"}
    for pkg in ("@y/websocket-server", "yjs", "ws", "y-protocols"):
        pj = NODE_DIR / "node_modules" / pkg / "package.json"
        if pj.exists():
            import json

            versions[pkg] = json.loads(pj.read_text(encoding="utf-8"))["version"]
    return Peer("y-websocket", True, versions=versions, command=[node, str(server)])


class Server:
    """A peer (or plain-broadcast) server as a child process on a loopback port."""

    def __init__(
        self, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.log = log
        with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
            )
        from .sync import listening

        end = time.monotonic() + 30
        while not listening(port):
            if self.proc.poll() is not None:
                err = log.read_text(errors="replace")
                raise RuntimeError(f"server {cmd[:2]} exited: {err[-500:]}")
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"server {cmd[:2]} not listening after 30 s")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
