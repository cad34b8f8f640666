"""A `pisf serve` process of our own for the tools that need a live server (`pisf demo`,
`pisf bench`): a free loopback port, start it, wait until it accepts connections, stop it."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server_process(port: int, log_path: Path, timeout_s: float = 60.0) -> subprocess.Popen:
    """`pisf serve` in its own process; returns once it accepts connections."""
    with open(log_path, "w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--port", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"\x04\x00")  # CLOSE: a polite probe the server answers and forgets
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start within {timeout_s:.0f} s; see {log_path}")


def start_server(log_path: Path, timeout_s: float = 60.0) -> tuple[subprocess.Popen, int]:
    """`pisf serve` on a free loopback port: (process, port)."""
    port = free_port()
    return start_server_process(port, log_path, timeout_s), port


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (the server drains its connections), SIGKILL after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
