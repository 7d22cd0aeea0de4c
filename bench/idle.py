"""Idle keep-alive connections held open against a server, as a crowd of quiet clients would.

Each connection makes one small request (HTTP/1.1, keep-alive), reads the answer to its end
and then sits idle, open. At the end, :meth:`Held.answering` proves each one is still open
on the server's side: a peek finds no close from the server, and one more request on it is answered.
"""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket

from bench.clients import BenchError


def raise_nofile() -> int:
    """Raise this process's soft limit of open files to the hard one (children inherit it); return it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _get(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    if response.status != 200 or response.will_close:
        raise BenchError(f"GET {path} on a held connection: status {response.status}"
                         f"{', the server closes the connection' if response.will_close else ''}")


def _open_on_server(sock: socket.socket) -> bool:
    """Nothing to read and no end-of-stream: the server has not closed (or reset) the connection."""
    timeout = sock.gettimeout()
    sock.setblocking(False)    # with a timeout, Python would wait for something to read first
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))   # unasked bytes: still open
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


class Held:
    """``count`` connections to ``host:port``, each after one GET of ``path``, held open until close()."""

    def __init__(self, host: str, port: int, path: str, count: int) -> None:
        self.path = path
        self.conns: list[http.client.HTTPConnection] = []
        try:
            for _ in range(count):
                conn = http.client.HTTPConnection(host, port, timeout=30)
                self.conns.append(conn)
                _get(conn, path)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise BenchError(f"opening idle connection {len(self.conns)} of {count} to {host}:{port}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def answering(self) -> int:
        """How many held connections are still open and answer one more request."""
        alive = 0
        for conn in self.conns:
            if conn.sock is None or not _open_on_server(conn.sock):
                continue
            with contextlib.suppress(OSError, http.client.HTTPException, BenchError):
                _get(conn, self.path)
                alive += 1
        return alive

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
