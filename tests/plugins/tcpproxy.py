"""A TCP proxy on loopback in front of a real server (sshd, PostgreSQL): the cable between a
client and that server, to pull. No mocks: the bytes pass through unchanged until it is."""
from __future__ import annotations

import socket
import threading


class TcpProxy:
    """Forwards each connection to ``target_port`` on loopback and counts them.

    * ``cut_after``: when set, a connection made from then on is dropped once that many
      client->server bytes passed (``cuts`` counts the drops);
    * :meth:`sever` pulls the cable on every connection made so far;
    * :meth:`cut` does so and refuses new connections until :meth:`open` (the server is out
      of this client's reach alone)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_after: int | None = None
        self.closed = False
        self.connections = 0
        self.cuts = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                if self.closed:
                    raise OSError("cut")
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            limit = self.cut_after
            threading.Thread(target=self._pump, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while data := src.recv(65536):
                if limit is not None and passed + len(data) > limit:
                    self.cuts += 1
                    break  # the cable is pulled: nothing more reaches the server
                dst.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def sever(self) -> None:
        """Pull the cable on every connection made so far."""
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Pull every cable and refuse new connections until :meth:`open`."""
        self.closed = True
        self.sever()

    def open(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.cut()
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        with self._lock:
            for s in self._open:
                s.close()
