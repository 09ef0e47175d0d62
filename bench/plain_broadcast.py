"""The plain-broadcast limit: a ``websockets`` server (the library the relay is
built on) that sends every message it receives to every connection, the
sender included, with ``websockets.broadcast`` and nothing else: no parsing,
no storage, no auth.

    python -m bench.plain_broadcast --port P
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(port: int) -> None:
    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        try:
            async for message in ws:
                broadcast(conns, message)
        finally:
            conns.discard(ws)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        handler, "127.0.0.1", port, max_size=None, compression=None, ping_interval=None
    ):
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
