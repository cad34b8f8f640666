"""Targets for Gadgetron's external Python gadgets (gadgetron-python `f(connection)`).

Gadgetron runs `python -m gadgetron <port> gadgets.gadgetron_external.targets <target>`; the
connection yields what the upstream gadgets send, `connection.send` passes items downstream.
These targets run the very same chains as the embedded server:

    <external><execute name="gadgets.gadgetron_external.targets" target="zerofill" type="python"/>
        <configuration><property name="chain" value="zerofill"/></configuration></external>

Parameters in `<configuration>` (`<property name=".." value=".."/>`) override the chain's
stage parameters as `stage.parameter` (e.g. `image_finish.series_index`) and are available to
stages as context parameters.

Failure: gadgetron-python closes normally even after an exception, so a failing chain sends
ERROR (id 8) to Gadgetron, then CLOSE, closes the socket and (in the per-scan process of
`<execute>`) exits at once with status 1, without waiting for threads. gadgetron-python 1.4.1
also spins forever at full CPU once Gadgetron has closed the socket (its reader loops on
recv() == b""): every target reads through a socket that raises on end of file instead.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import sys

import numpy as np

from .. import limit_blas_threads
from ..chain import ChainRepository, apply_overrides, configuration_properties, run_stages
from ..context import StreamContext
from ..items import Notice

log = logging.getLogger("pisf.external")
_ERROR_ID, _CLOSE_ID = 8, 4

# target -> (what it reads, what it sends on); gadgets.gadgetron_external.checks follows the types
TARGET_TYPES = {"pisf": ("acquisition", "image"), "zerofill": ("acquisition", "image"),
                "chain": ("acquisition", "image"), "pisf_buffers": ("buffer", "image"),
                "zerofill_buffers": ("buffer", "image"), "chain_buffers": ("buffer", "image"),
                "prewhiten": ("acquisition", "acquisition")}


class GadgetronClosed(ConnectionError):
    """Gadgetron closed the connection while we were reading."""


class EofSafeSocket:
    """The socket under a gadgetron-python connection, raising GadgetronClosed at end of file
    (gadgetron-python's own reader would loop forever on it).

    opening_timeout: seconds allowed for Gadgetron's config and header (a persistent worker
    builds the connection on this socket); `opened()` then restores what was asked for.
    """

    def __init__(self, sock: socket.socket, opening_timeout: float | None = None):
        self._sock = sock
        self._timeout_after_opening = sock.gettimeout()
        self._opening = opening_timeout is not None
        if self._opening:
            sock.settimeout(opening_timeout)

    def settimeout(self, value) -> None:
        self._timeout_after_opening = value
        if not self._opening:
            self._sock.settimeout(value)

    def opened(self) -> None:
        self._opening = False
        self._sock.settimeout(self._timeout_after_opening)

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = self._sock.recv(size, flags)
        if size and not data:
            raise GadgetronClosed("Gadgetron closed the connection")
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def guard_connection(connection) -> None:
    """Read the rest of this gadgetron-python connection through an EofSafeSocket."""
    wrapper = getattr(connection, "socket", None)
    raw = getattr(wrapper, "socket", None)
    if raw is not None and not isinstance(raw, EofSafeSocket):
        wrapper.socket = EofSafeSocket(raw)


def _raw_socket(connection):
    """The socket.socket under a gadgetron-python connection (or the socket itself)."""
    raw = connection if isinstance(connection, (socket.socket, EofSafeSocket)) else \
        getattr(getattr(connection, "socket", None), "socket", None)
    return raw._sock if isinstance(raw, EofSafeSocket) else raw


def send_error_and_close(connection, text: str) -> None:
    """ERROR (uint64 length + text), then CLOSE, then close the socket: each step on its own, so a
    peer that is gone already costs nothing more than a log line."""
    raw = text.encode("utf-8")
    sock = _raw_socket(connection)
    if sock is None:
        return
    for what, frame in (("ERROR", struct.pack("<HQ", _ERROR_ID, len(raw)) + raw),
                        ("CLOSE", struct.pack("<H", _CLOSE_ID))):
        try:
            sock.sendall(frame)
        except OSError as exc:
            log.warning("could not send %s to Gadgetron: %s", what, exc)
            break
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def exit_now(status: int = 1) -> None:
    """Leave the per-scan process at once: logs flushed, no waiting for threads (model sessions,
    pools) that would keep a failed scan's process alive."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


# Stages done before BucketToBuffer (our `prewhiten` node or NoiseAdjust, RemoveROOversampling,
# AcquisitionAccumulateTrigger + BucketToBuffer): dropped when our chain receives ReconData.
BUFFERED_UPSTREAM = ("noise_prewhitening", "remove_oversampling", "slice_accumulator")


def _sendable(item):
    """gadgetron-python 1.4.1 writes ImageArray/ReconData with np.array(copy=False), which fails
    on numpy 2 unless the data already is complex64: convert before sending."""
    buffers = [item] if hasattr(item, "data") and hasattr(item, "headers") else []
    for bit in getattr(item, "bits", None) or []:
        buffers += [b for b in (getattr(bit, "data", None), getattr(bit, "ref", None)) if b is not None]
    for buffer in buffers:
        if isinstance(getattr(buffer, "data", None), np.ndarray) and buffer.data.dtype != np.complex64:
            buffer.data = buffer.data.astype(np.complex64)
    return item


def run_chain(connection, chain_name: str | None = None, buffers: bool = False,
              defaults: dict[str, str] | None = None, only: tuple[str, ...] | None = None) -> None:
    """Run a chain over a gadgetron-python connection; the chain name may come from the config.

    defaults: properties that apply unless the connection's `<configuration>` sets them.
    buffers: the input is Gadgetron ReconData (after BucketToBuffer); the chain's buffering stages
    are dropped and the buffers become KSpaceSlices (gadgets.gadgetron_external.recondata).
    only: run just these stages of the chain (the `prewhiten` target).
    On failure: ERROR and CLOSE to Gadgetron, socket closed, then the exception is raised again.
    """
    # defaults: properties of a persistent worker (pisf gadgetron-worker --property), under the config's
    properties = {**(defaults or {}), **configuration_properties(getattr(connection, "config", None))}
    chain_name = properties.get("chain", chain_name or "zerofill")
    try:
        guard_connection(connection)
        limit_blas_threads()  # inside the try: any failure must reach Gadgetron as ERROR
        spec = ChainRepository.shared().load(chain_name)
        apply_overrides(spec, properties)
        if buffers:
            spec.stages = [(name, parameters) for name, parameters in spec.stages if name not in BUFFERED_UPSTREAM]
        if only is not None:
            spec.stages = [(name, parameters) for name, parameters in spec.stages if name in only]
        context = StreamContext(header=connection.header, parameters=dict(properties))
        stages = spec.build(context)
        if buffers:
            from .recondata import ReconDataAdapter

            stages.insert(0, ReconDataAdapter(context))
        log.info("chain %s running inside Gadgetron", spec.name)
        for output in run_stages(stages, iter(connection)):
            if isinstance(output, Notice):
                log.log(output.level, output.text)
            else:
                # Images, and anything our stages do not consume (e.g. waveforms), go downstream.
                connection.send(_sendable(output))
    except Exception as exc:
        log.exception("chain %s failed", chain_name)
        send_error_and_close(connection, f"pisf chain {chain_name!r} failed: {type(exc).__name__}: {exc}")
        raise


def _run_scan(connection, chain_name: str | None, buffers: bool = False, only: tuple[str, ...] | None = None) -> None:
    """One `<execute>` scan in its own process: on failure the process ends at once (status 1)."""
    try:
        run_chain(connection, chain_name, buffers=buffers, only=only)
    except Exception:  # already logged and sent to Gadgetron as ERROR
        exit_now(1)


def zerofill(connection) -> None:
    _run_scan(connection, "zerofill")


def pisf(connection) -> None:
    _run_scan(connection, "pisf")


def chain(connection) -> None:
    """Generic target: the chain is named by the `chain` property of `<configuration>`."""
    _run_scan(connection, None)


def pisf_buffers(connection) -> None:
    """PISF on Gadgetron ReconData buffers (after our prewhitening, RemoveROOversampling,
    AcquisitionAccumulateTrigger, BucketToBuffer)."""
    _run_scan(connection, "pisf", buffers=True)


def zerofill_buffers(connection) -> None:
    _run_scan(connection, "zerofill", buffers=True)


def chain_buffers(connection) -> None:
    """Like `chain`, for ReconData input."""
    _run_scan(connection, None, buffers=True)


def prewhiten(connection) -> None:
    """Noise prewhitening alone, ahead of Gadgetron's own gadgets: acquisitions in, whitened
    acquisitions out, noise readouts consumed (the `noise_prewhitening` stage of the chain named
    by `chain`, default pisf). Replaces NoiseAdjustGadget, which needs a storage server, and runs on
    a distributed chain's gateway so that every worker gets whitened lines."""
    _run_scan(connection, "pisf", only=("noise_prewhitening",))
