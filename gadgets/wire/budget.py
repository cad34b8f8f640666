"""Bytes of received lines waiting for their chain, bounded per connection and for the whole server.

A connection's reader charges each line before queueing it for the chain and waits while the
connection or the server is over budget; while it waits it reads nothing from the socket, so
the scanner is pushed back through TCP instead of the server growing. The chain gives a line's
bytes back when it takes the line from the queue.

A line always fits into a connection whose queue is empty: a line larger than the budget still
passes (its size is bounded by the header checks, gadgets/wire/validate.py), and a connection
never waits with nothing queued, so every chain keeps being fed. The server total may therefore
exceed its budget by at most one line per connection.
"""
from __future__ import annotations

import threading
from typing import Callable

import ismrmrd

from .protocol import ACQUISITION_HEADER_BYTES

MIB = 1024 * 1024
DEFAULT_CONNECTION_BYTES = 256 * MIB
DEFAULT_SERVER_BYTES = 1024 * MIB
POLL_S = 0.5  # how often a waiting reader asks whether to give up (chain ended, client gone)


def item_bytes(item) -> int:
    """What a queued item holds: samples, trajectory and header of an acquisition."""
    if isinstance(item, ismrmrd.Acquisition):
        return int(item.data.nbytes) + int(item.traj.nbytes) + ACQUISITION_HEADER_BYTES
    return ACQUISITION_HEADER_BYTES


class ByteBudget:
    """The server's budget: bytes queued over all connections (thread-safe)."""

    def __init__(self, server_bytes: int = DEFAULT_SERVER_BYTES,
                 connection_bytes: int = DEFAULT_CONNECTION_BYTES):
        if server_bytes < 1 or connection_bytes < 1:
            raise ValueError(f"byte budgets must be positive (server {server_bytes}, connection {connection_bytes})")
        self.server_bytes, self.connection_bytes = int(server_bytes), int(connection_bytes)
        self.condition = threading.Condition()
        self.queued = 0     # bytes queued now, all connections
        self.peak = 0       # the most ever queued at once
        self.waits = 0      # times a reader had to wait (pushed back)

    def connection(self) -> "ConnectionBudget":
        return ConnectionBudget(self)


class ConnectionBudget:
    """One connection's share: charge before queueing, give back when the chain takes the line."""

    def __init__(self, server: ByteBudget):
        self.server = server
        self.queued = 0
        self.peak = 0
        self.waits = 0

    def _fits(self, nbytes: int) -> bool:
        if self.queued == 0:
            return True
        return (self.queued + nbytes <= self.server.connection_bytes
                and self.server.queued + nbytes <= self.server.server_bytes)

    def acquire(self, nbytes: int, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Charge nbytes, waiting while over budget; False (nothing charged) once give_up() is true."""
        server = self.server
        with server.condition:
            if not self._fits(nbytes):
                self.waits += 1
                server.waits += 1
            while not self._fits(nbytes):
                if give_up():
                    return False
                server.condition.wait(POLL_S)
            self.queued += nbytes
            server.queued += nbytes
            self.peak = max(self.peak, self.queued)
            server.peak = max(server.peak, server.queued)
            return True

    def release(self, nbytes: int) -> None:
        server = self.server
        with server.condition:
            nbytes = min(nbytes, self.queued)
            self.queued -= nbytes
            server.queued -= nbytes
            server.condition.notify_all()

    def close(self) -> None:
        """The connection ended: whatever it still had charged goes back."""
        self.release(self.queued)
