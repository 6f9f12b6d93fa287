"""FaultProxy: a loopback TCP proxy whose behaviour a synchronous test switches at run time.

Kernel netem is not available on the machines that run the suite, so network faults between the gateway
and the HIS (or a platform and the gateway) are made by putting this proxy between them::

    lock = Lock(tmp_path)
    with FaultProxy(lock.his_port) as his_link:          # gateway -> proxy -> HIS simulator
        lock.gateway_config["inner"]["his"]["port"] = his_link.port
        lock.write_configs()
        with lock:
            his_link.drop()        # the HIS goes silent
            ...
            his_link.pass_through()

The proxy runs an asyncio loop in a daemon thread; every public method may be called from any other
thread and takes effect before it returns. Vocabulary: *client* is whoever connects to the proxy, *upstream*
is the target; ``up`` is client -> upstream, ``down`` is upstream -> client.

Modes (one at a time, for the whole proxy):

========================  ======================================  ===========================================
mode                      new connections                         data on established connections
========================  ======================================  ===========================================
``pass_through()``        accepted, upstream connected at once    forwarded
``delay(s)``              accepted, upstream connected at once    each chunk delivered ``s`` seconds after it
                                                                  was read (each direction; order kept)
``drop()``                accepted, never connected upstream      read and discarded, both directions ("silent
                                                                  HIS"); chunks still queued are discarded
``black_hole()``          accepted, never read                    nothing read and nothing delivered (a
                                                                  partition); when the mode changes back,
                                                                  what was held is delivered (TCP retransmits)
``refuse()``              reset at once (RST)                     forwarded (combine with ``cut()``)
========================  ======================================  ===========================================

A connection is *new* when the proxy accepts it, which can be a moment after the client's ``connect()``
returned: to make an existing connection immune to ``refuse()``, exchange something through it first. A
refused client may see the RST as the error of ``connect()`` itself or of its first read/write.

A connection accepted while the upstream was not connected (``drop``/``black_hole``) connects upstream
when it first has data to deliver in a forwarding mode. If the upstream cannot be reached, the client's
connection is reset (as if the target were down). ``cut()`` is an action, not a mode: every current
connection is closed at once, both sides, with RST. ``close()`` closes everything and stops the thread.

Bounded: at most ``max_connections`` connections (more are reset), at most ``queue_chunks`` chunks of
``chunk_size`` bytes buffered per direction per connection (then reading pauses), upstream connects time
out after ``connect_timeout``; the proxy only listens on and connects to loopback addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable

__all__ = ["MODES", "FaultProxy"]

MODES = ("pass_through", "delay", "drop", "black_hole", "refuse")
_FORWARDING = ("pass_through", "delay", "refuse")
_CALL_TIMEOUT = 10.0

_COUNTERS = ("accepted", "refused", "upstream_connects", "upstream_failures", "cut", "closed",
             "bytes_up", "bytes_down", "dropped_up", "dropped_down")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close a transport now, with RST (SO_LINGER 0) where the socket allows it."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class _Closed(Exception):
    """The connection is being torn down."""


class _Connection:
    """One client connection and (maybe) its upstream connection: four small tasks, two FIFO queues."""

    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.proxy = proxy
        self.client_reader, self.client_writer = reader, writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.queues = {"up": asyncio.Queue(proxy.queue_chunks), "down": asyncio.Queue(proxy.queue_chunks)}
        self.tasks: set[asyncio.Task] = set()
        self.finished = {"up": False, "down": False}
        self.done = asyncio.Event()
        self._connecting: asyncio.Future | None = None

    # -- life cycle --------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.proxy._mode in _FORWARDING:
                await self._ensure_upstream()
            self._spawn(self._read(self.client_reader, "up"))
            self._spawn(self._write("up"))
            await self.done.wait()
        except _Closed:
            pass

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _guard(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except (_Closed, OSError, ConnectionError, asyncio.IncompleteReadError, RuntimeError):
            self.abort()

    def abort(self) -> None:
        """Tear down both sides at once, with RST."""
        if self.done.is_set():
            return
        self.done.set()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        _reset(self.client_writer.transport)
        if self.up_writer is not None:
            _reset(self.up_writer.transport)

    def _finish(self, direction: str) -> None:
        self.finished[direction] = True
        if self.finished["up"] and (self.up_writer is None or self.finished["down"]):
            if not self.done.is_set():
                self.done.set()
                self.client_writer.close()
                if self.up_writer is not None:
                    self.up_writer.close()
                self.proxy._count("closed")

    async def _ensure_upstream(self) -> asyncio.StreamWriter:
        if self.up_writer is not None:
            return self.up_writer
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                host, port = self.proxy.target
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                        self.proxy.connect_timeout)
            except (TimeoutError, OSError) as e:
                self.proxy._count("upstream_failures")
                self._connecting.set_exception(_Closed(str(e)))
                self._connecting.exception()  # retrieved: no "never retrieved" warning
                self.abort()
                raise _Closed(str(e)) from None
            if self.done.is_set():  # cut or closed while connecting
                _reset(writer.transport)
                raise _Closed("closed while connecting")
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.up_reader, self.up_writer = reader, writer
            self.proxy._count("upstream_connects")
            self._spawn(self._read(reader, "down"))
            self._spawn(self._write("down"))
            self._connecting.set_result(writer)
            return writer
        return await asyncio.shield(self._connecting)

    # -- pumps -------------------------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader, direction: str) -> None:
        proxy, queue, loop = self.proxy, self.queues[direction], asyncio.get_running_loop()
        while True:
            await proxy._until(lambda: proxy._mode != "black_hole")
            data = await reader.read(proxy.chunk_size)
            if not data:
                await queue.put(None)
                return
            if proxy._mode == "drop":
                proxy._count(f"dropped_{direction}", len(data))
                continue
            await queue.put((loop.time() + (proxy._delay if proxy._mode == "delay" else 0.0), data))

    async def _write(self, direction: str) -> None:
        proxy, queue, loop = self.proxy, self.queues[direction], asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is None:
                writer = self.up_writer if direction == "up" else self.client_writer
                if writer is not None and writer.can_write_eof() and not writer.transport.is_closing():
                    try:
                        writer.write_eof()
                    except OSError:
                        pass
                self._finish(direction)
                return
            deliver_at, data = item
            wait = deliver_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await proxy._until(lambda: proxy._mode != "black_hole")
            if proxy._mode == "drop":
                proxy._count(f"dropped_{direction}", len(data))
                continue
            writer = await self._ensure_upstream() if direction == "up" else self.client_writer
            writer.write(data)
            await writer.drain()
            proxy._count(f"bytes_{direction}", len(data))


class FaultProxy:
    """A TCP proxy on ``127.0.0.1:<port>`` to ``target_host:target_port`` with switchable faults.

    ``FaultProxy(target_port, target_host="127.0.0.1", *, listen_port=0, max_connections=256,
    connect_timeout=5.0, chunk_size=65536, queue_chunks=16)``. See the module docstring for the modes.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, listen_port: int = 0,
                 max_connections: int = 256, connect_timeout: float = 5.0, chunk_size: int = 65536,
                 queue_chunks: int = 16):
        if not _is_loopback(target_host):
            raise ValueError(f"FaultProxy only forwards to loopback, not {target_host!r}")
        self.target = (target_host, int(target_port))
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size
        self.queue_chunks = queue_chunks
        self._mode = "pass_through"
        self._delay = 0.0
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._stats_lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._changed: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run_loop, name=f"FaultProxy->{target_port}", daemon=True)
        self._thread.start()
        try:
            self._server = self._call(self._start(listen_port))
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    # -- public API (any thread) -------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @property
    def delay_seconds(self) -> float:
        return self._delay if self._mode == "delay" else 0.0

    def pass_through(self) -> FaultProxy:
        return self._set_mode("pass_through")

    def delay(self, seconds: float) -> FaultProxy:
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        return self._set_mode("delay", float(seconds))

    def drop(self) -> FaultProxy:
        return self._set_mode("drop")

    def black_hole(self) -> FaultProxy:
        return self._set_mode("black_hole")

    def refuse(self) -> FaultProxy:
        return self._set_mode("refuse")

    def cut(self) -> int:
        """Close every current connection now (both sides, RST). Returns how many were cut."""
        return self._call(self._cut())

    def retarget(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """Send *new* upstream connections elsewhere (e.g. a restarted peer on another port)."""
        if not _is_loopback(target_host):
            raise ValueError(f"FaultProxy only forwards to loopback, not {target_host!r}")
        self.target = (target_host, int(target_port))

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters, plus ``active`` (connections open now)."""
        with self._stats_lock:
            out = dict(self._stats)
        out["active"] = len(self._conns)
        return out

    @property
    def accepted(self) -> int:
        return self.stats()["accepted"]

    @property
    def bytes_up(self) -> int:
        return self.stats()["bytes_up"]

    @property
    def bytes_down(self) -> int:
        return self.stats()["bytes_down"]

    @property
    def active(self) -> int:
        return len(self._conns)

    def wait_for(self, predicate: Callable[[dict[str, int]], bool], timeout: float = 10.0) -> dict[str, int]:
        """Poll ``predicate(stats())`` until true; ``TimeoutError`` (with the last stats) after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.stats()
            if predicate(snapshot):
                return snapshot
            if time.monotonic() >= deadline:
                raise TimeoutError(f"FaultProxy: condition not met within {timeout}s (stats {snapshot})")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop listening, reset every connection and stop the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy 127.0.0.1:{getattr(self, 'port', '?')} -> {self.target[0]}:{self.target[1]} {self._mode}>"

    # -- plumbing ----------------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro):
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy's public methods are for other threads")
        if self._loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("FaultProxy is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    def _stop_loop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CALL_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def _set_mode(self, mode: str, delay: float = 0.0) -> FaultProxy:
        if self._closed:
            raise RuntimeError("FaultProxy is closed")
        self._call(self._apply(mode, delay))
        return self

    async def _apply(self, mode: str, delay: float) -> None:
        self._mode, self._delay = mode, delay
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def _start(self, listen_port: int) -> asyncio.AbstractServer:
        self._changed = asyncio.Event()
        return await asyncio.start_server(self._on_client, "127.0.0.1", listen_port, limit=self.chunk_size,
                                          backlog=128)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count("accepted")
        if self._closed or self._mode == "refuse" or len(self._conns) >= self.max_connections:
            self._count("refused")
            _reset(writer.transport)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            if not conn.done.is_set():
                conn.abort()

    async def _cut(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
            self._conns.discard(conn)
        self._count("cut", len(conns))
        await asyncio.sleep(0)  # let the aborts reach the sockets before answering
        return len(conns)

    async def _shutdown(self) -> None:
        self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        try:
            await asyncio.wait_for(self._server.wait_closed(), 2)
        except TimeoutError:
            pass
        await asyncio.sleep(0.01)  # let the transports' connection_lost callbacks run before the loop stops
