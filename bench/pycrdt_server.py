"""pycrdt-websocket's server with pycrdt-store's SQLite store, as its
documentation wires them, served over ``websockets`` on loopback.

Runs in the peers' venv (``bench/.peers/py``, made by ``bench.peer_env``), not
in Branchline's: it imports only pycrdt, pycrdt-websocket, pycrdt-store and
websockets.

    bench/.peers/py/bin/python bench/pycrdt_server.py --port P --db FILE

One room per websocket path. A room is made with a ``SQLiteYStore`` for its
path, loaded from the store before it is marked ready (so a room made again
after its last client left, ``auto_clean_rooms``, catches up from the store),
and every update the room's document sees is broadcast to all of the room's
clients (the sender included) and written to the store, as YRoom does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any

from pycrdt.store import SQLiteYStore, YDocNotFound  # type: ignore[import-not-found]
from pycrdt.websocket import WebsocketServer, YRoom  # type: ignore[import-not-found]
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class Channel:
    """pycrdt's ``Channel`` over a ``websockets`` server connection."""

    def __init__(self, ws: ServerConnection, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration() from None

    async def send(self, message: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(message)

    async def recv(self) -> bytes:
        message = await self._ws.recv()
        return message if isinstance(message, bytes) else message.encode()


def store_class(db_path: str) -> type[Any]:
    class Store(SQLiteYStore):  # type: ignore[misc]
        pass

    Store.db_path = db_path
    return Store


class StoreServer(WebsocketServer):  # type: ignore[misc]
    def __init__(self, db_path: str) -> None:
        super().__init__(rooms_ready=False, log=logging.getLogger("pycrdt-server"))
        self.store = store_class(db_path)

    async def get_room(self, name: str) -> YRoom:
        if name not in self.rooms:
            room = YRoom(ready=False, ystore=self.store(path=name), log=self.log)
            self.rooms[name] = room
            await self.start_room(room)
            await room.ystore.started.wait()
            with contextlib.suppress(YDocNotFound):
                await room.ystore.apply_updates(room.ydoc)
            room.ready = True
        room = self.rooms[name]
        await self.start_room(room)
        return room


async def main(port: int, db_path: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    server = StoreServer(db_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        await server.serve(Channel(ws, path))

    async with (
        server,
        serve(handler, "127.0.0.1", port, max_size=None, compression=None, ping_interval=None),
    ):
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    opts = parser.parse_args()
    asyncio.run(main(opts.port, opts.db))
