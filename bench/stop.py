"""How fast Ctrl-C ends ``node run`` and ``node serve`` (issue 18).

    python -m bench.stop [--rounds N] [--records N]

Cases, each ``--rounds`` times with a fresh process: ``node run`` idle and
online; ``node run`` during its first pass over ``--records`` records held by
the relay; ``node run`` with the relay down (backing off); ``node serve``
idle. The time is from sending SIGINT to the process's exit (``wait``);
every exit code must be 130. Prints median and max, with the load average.
Results go to ``bench/results/stop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from harness.net import free_port

BRANCHLINE = [str(Path(sys.executable).parent / "branchline")]
RESULTS = Path(__file__).parent / "results" / "stop.json"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BRANCHLINE, *args], capture_output=True, text=True, check=True)


def wait_until(predicate: Callable[[], bool], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("not ready in time")
        time.sleep(0.02)


def state(home: Path) -> str:
    return str(json.loads(cli("status", "--home", str(home), "--json").stdout)["state"])


def interrupt(proc: subprocess.Popen[bytes]) -> float:
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    took = time.perf_counter() - sent
    if proc.returncode != 130:
        raise RuntimeError(f"exit code {proc.returncode}, not 130")
    return took


def served(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return int(r.status) == 200
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=5000)
    args = parser.parse_args()
    out: dict[str, list[float]] = {"run_online": [], "run_first_pass": [], "run_offline": []}
    out["serve"] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        relay_db, port = tmp / "relay.db", free_port()
        with SqliteRelayStore.create(relay_db) as store:
            tokens = {f"N{i}": store.enroll("acme", f"N{i}").token for i in range(args.rounds * 2)}
            tokens["A"] = store.enroll("acme", "A").token
        relay = subprocess.Popen(
            [*BRANCHLINE, "relay", "serve", str(relay_db), "--port", str(port)],
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"ws://127.0.0.1:{port}/"
            token_a = tokens["A"]
            with Node.create(tmp / "A", dataset="acme", node="A", relay=url, token=token_a) as a:
                for i in range(args.records):
                    a.put("customers", {"code": f"K{i:06d}", "name": f"Customer {i}"})
            cli("sync", "--home", str(tmp / "A"), "--timeout", "600")
            for r in range(args.rounds):
                cases = (("run_online", f"N{2 * r}"), ("run_first_pass", f"N{2 * r + 1}"))
                for case, name in cases:
                    home = tmp / name
                    cli("node", "init", "--home", str(home), "--dataset", "acme",
                        "--node", name, "--relay", url, "--token", tokens[name])  # fmt: skip
                    if case == "run_online":
                        cli("sync", "--home", str(home), "--timeout", "600")
                    proc = subprocess.Popen(
                        [*BRANCHLINE, "node", "run", "--home", str(home)],
                        stderr=subprocess.DEVNULL,
                    )
                    wait_until(lambda h=home: state(h) == "online")  # type: ignore[misc]
                    if case == "run_online":
                        time.sleep(1.0)  # idle, synced
                    out[case].append(interrupt(proc))
                down = tmp / f"down{r}"
                cli("node", "init", "--home", str(down), "--dataset", "acme", "--node", "D",
                    "--relay", f"ws://127.0.0.1:{free_port()}/", "--token", "x")  # fmt: skip
                proc = subprocess.Popen(
                    [*BRANCHLINE, "node", "run", "--home", str(down)], stderr=subprocess.DEVNULL
                )
                wait_until(lambda h=down: state(h) == "backing off")  # type: ignore[misc]
                out["run_offline"].append(interrupt(proc))
                serve_home, serve_port = tmp / f"serve{r}", free_port()
                Node.create(serve_home, dataset="acme", node="S").close()
                proc = subprocess.Popen(
                    [*BRANCHLINE, "node", "serve", "--home", str(serve_home),
                     "--listen", f"127.0.0.1:{serve_port}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                wait_until(lambda p=serve_port: served(p))  # type: ignore[misc]
                out["serve"].append(interrupt(proc))
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
    load = os.getloadavg()
    result = {
        "records": args.records,
        "rounds": args.rounds,
        "load_average": [round(x, 2) for x in load],
        "seconds": {k: [round(v, 4) for v in vs] for k, vs in out.items()},
        "median_s": {k: round(statistics.median(vs), 4) for k, vs in out.items()},
        "max_s": {k: round(max(vs), 4) for k, vs in out.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Ctrl-C -> exit (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    for k in out:
        print(f"  {k:16s} median {result['median_s'][k]:.3f} s  max {result['max_s'][k]:.3f} s")


if __name__ == "__main__":
    main()
