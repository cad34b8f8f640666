"""TLS over a connected socket that one thread reads while another writes.

The server (reader thread + chain thread) and `pisf replay` (sender + receiver thread) use each
connection full duplex. An `ssl.SSLSocket` must not be used from two threads at once (OpenSSL
state is shared by reads and writes: concurrent use corrupts records, seen as "bad record mac").
Here the TLS state is an `ssl.SSLObject` over memory buffers, touched only under a lock; the
socket I/O (which blocks, with the socket's timeout) happens outside that lock, so a blocked send
never stops the reader, and the other way round.
"""
from __future__ import annotations

import socket
import ssl
import threading


class TlsSocket:
    """The parts of the socket API the server and client use: recv, sendall, settimeout,
    shutdown, close, context manager. The handshake is done in the constructor (within the
    socket's timeout); certificate errors raise ssl.SSLError there."""

    def __init__(self, context: ssl.SSLContext, sock: socket.socket, server_side: bool,
                 server_hostname: str | None = None):
        self._sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._lock = threading.Lock()        # TLS state
        self._send_lock = threading.Lock()   # order of encrypted bytes on the wire
        self._shut = False
        self._handshake()

    # ---- internals
    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._out.read()
            if data:
                self._sock.sendall(data)

    def _feed(self) -> None:
        data = self._sock.recv(1 << 16)
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()

    def _handshake(self) -> None:
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
            except ssl.SSLError:
                try:
                    self._flush()  # the alert, so the peer learns why
                except OSError:
                    pass
                raise

    # ---- socket API
    def recv(self, n: int) -> bytes:
        if self._shut:
            return self._sock.recv(n)  # draining after our close_notify: raw bytes, discarded by the caller
        while True:
            with self._lock:
                try:
                    data = self._tls.read(n)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
                pending = self._out.pending
            if pending:
                self._flush()  # e.g. a key update answer
            if data is not None:
                return data
            self._feed()

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                view = memoryview(data)
                while view:
                    written = self._tls.write(view)
                    view = view[written:]
                encrypted = self._out.read()
            self._sock.sendall(encrypted)

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._shut:
            self._shut = True
            try:
                with self._lock:
                    self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: our close_notify is queued; the peer's is not awaited
            try:
                self._flush()
            except OSError:
                pass
        self._sock.shutdown(how)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "TlsSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
