"""The embedded inline recon server: ISMRMRD streaming protocol over TCP, one chain per connection.

Each connection gets a reader (this thread) and a chain thread joined by a queue bounded in
items and in bytes (per connection and over the server: gadgets/wire/budget.py), so lines keep
arriving while earlier slices reconstruct and a slow chain pushes back on the client through
TCP instead of growing memory. Every acquisition's declared sizes are checked against the
scan's header before its payload is read (gadgets/wire/validate.py); when a connection ends,
freed memory is handed back to the system (gadgets/wire/memory.py). Every failure ends with a TEXT naming the
problem, then CLOSE; slices already complete are reconstructed and sent before that.

A client that has gone (a reset seen by a read, a send that fails, or, once its data are all
read, a reset found by polling the connection's TCP state) cancels its stream: the stages stop
at the next slice and its queued work is dropped (StreamContext.cancelled). An end of stream
alone (FIN) is not a departure: clients half-close after CLOSE and still read their images.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import logging
import queue
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ismrmrd

from .. import limit_blas_threads
from .. import inference_pool
from ..chain import ChainRepository, ChainSpec, ConfigError, is_valid_name, run_stages
from ..context import InputError, StreamCancelled, StreamContext, parse_header
from ..items import Notice
from . import memory, protocol
from .budget import DEFAULT_CONNECTION_BYTES, DEFAULT_SERVER_BYTES, MIB, ByteBudget, ConnectionBudget, item_bytes
from .query import QueryAnswers
from .session_config import (DEFAULT_NAME, OPENRECON_NAME, apply_parameters, looks_like_json, parse_client_json,
                             select_chain)
from .tls import TlsSocket
from .validate import AcquisitionValidator, header_warnings

log = logging.getLogger("pisf.server")
_END = object()
_ABORT = object()  # the client is gone: open slices are dropped, not flushed
_NOTHING = object()  # the client ended (between frames) before sending data
_TCP_CLOSE = 7       # tcpi_state of a connection the peer reset (Linux include/net/tcp_states.h)
WATCH_S = 0.1        # how often a connection whose input is all read is checked for a reset
DEFAULT_MALLOC_ARENAS = 2  # `pisf serve --malloc-arenas`: 16 clients x 4 slices peak RSS 680 vs 810-847 MiB with glibc's 16 (gadgets/wire/memory.py)


_connection_ids = itertools.count(1)


class _StreamAborted(Exception):
    """Raised inside the chain's input when the client is gone: open slices are not flushed."""


def peer_reset(sock: socket.socket | None) -> bool:
    """True when the peer has reset this TCP connection (Linux TCP_INFO state; False elsewhere).
    Unlike a read, this consumes nothing and tells a reset from a half-close (FIN)."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_CLOSE
    except OSError:
        return False


class _Sender:
    """Thread-safe frame sender; after CLOSE (or a dead peer) further sends are dropped.

    `gone` is set once the peer is known to be gone; the stream's context shares it as its
    cancelled flag. raw: the TCP socket under a TLS wrapper (for `peer_reset`)."""

    def __init__(self, sock: socket.socket, name: str, raw: socket.socket | None = None):
        self.sock, self.name = sock, name
        self.raw = raw if raw is not None else (sock if isinstance(sock, socket.socket) else None)
        self.lock = threading.Lock()
        self.closed = False
        self.gone = threading.Event()

    @property
    def peer_gone(self) -> bool:
        return self.gone.is_set()

    @peer_gone.setter
    def peer_gone(self, value: bool) -> None:
        if value:
            self.gone.set()

    def check_peer(self) -> bool:
        """True once the peer is gone; asks the connection (a reset no read has seen yet)."""
        if not self.gone.is_set() and peer_reset(self.raw):
            log.warning("%s: the client reset the connection", self.name)
            self.gone.set()
        return self.gone.is_set()

    def send(self, frame: bytes) -> bool:
        with self.lock:
            if self.closed or self.peer_gone:
                return False
            try:
                self.sock.sendall(frame)
                return True
            except OSError as exc:
                log.warning("%s: client gone while sending (%s)", self.name, exc)
                self.peer_gone = True
                return False

    def close(self, error: str | None = None) -> None:
        """Send the TEXT error (if any) and CLOSE, once."""
        if error:
            log.error("%s: %s", self.name, error)
            self.send(protocol.frame_text(f"ERROR: {error}"))
        self.send(protocol.frame_close())
        with self.lock:
            self.closed = True


class _ChainRunner(threading.Thread):
    """Runs one chain over the items the reader queues; sends images and notices as they come."""

    def __init__(self, spec: ChainSpec, context: StreamContext, sender: _Sender, queue_size: int,
                 budget: ConnectionBudget):
        super().__init__(name=f"{sender.name}-chain", daemon=True)
        self.spec, self.context, self.sender = spec, context, sender
        # entries (item, arrival, bytes charged to `budget`); bounded in items and, by the budget, in bytes
        self.items: queue.Queue = queue.Queue(maxsize=queue_size)
        self.budget = budget
        self.error: str | None = None
        self.images_sent = 0
        self.images_made = 0
        self.cancelled: str | None = None  # why the stream stopped early because its client has gone
        self.ended = threading.Event()     # the chain has stopped consuming
        self.stages = spec.build(context)  # built in the reader thread: config errors surface at once

    def _incoming(self):
        while True:
            try:
                entry = self.items.get(timeout=WATCH_S)
            except queue.Empty:
                # a stage's helper thread (pisf_recon's slices_ahead) may still wait here after the
                # chain stopped: let it end
                if self.ended.is_set():
                    raise _StreamAborted() from None
                continue
            if self.context.cancelled.is_set():
                raise StreamCancelled("the client has gone; its queued lines are dropped")
            if entry is _END:
                return
            if entry is _ABORT:
                raise _StreamAborted()
            item, arrival, nbytes = entry
            self.budget.release(nbytes)  # the chain holds it now: the reader may read on
            self.context.last_arrival = arrival
            yield item

    def run(self) -> None:
        try:
            for output in run_stages(self.stages, self._incoming()):
                if self.sender.peer_gone:
                    # The client stopped receiving (write timeout) or vanished: computing the rest
                    # of the scan for nobody only holds memory and CPU; stop, and let the reader stop.
                    self.error = self.cancelled = "the client stopped receiving images"
                    break
                if isinstance(output, ismrmrd.Image):
                    self.images_made += 1
                    self.images_sent += self.sender.send(protocol.frame_image(output))
                    latency = output.meta.get("PISF_LatencyMs", "?")
                    log.info("%s: image %d (slice %d, phase %d, repetition %d) sent, %s ms after its last line",
                             self.sender.name, output.image_index, output.slice, output.phase, output.repetition,
                             latency)
                elif isinstance(output, Notice):
                    log.log(output.level, "%s: %s", self.sender.name, output.text)
                    self.sender.send(protocol.frame_text(output.text))
        except _StreamAborted:
            pass  # everything queued before the abort was processed: complete slices were sent
        except StreamCancelled as exc:
            self.cancelled = str(exc)
        except InputError as exc:
            self.error = str(exc)
        except Exception as exc:  # a gadget failed: report it, keep the server alive
            log.exception("%s: chain %s failed", self.sender.name, self.spec.name)
            self.error = f"reconstruction failed in chain {self.spec.name!r}: {type(exc).__name__}: {exc}"
        finally:
            self.ended.set()
            # Unblock the reader if it is waiting on a full queue, and give the bytes back.
            while True:
                try:
                    entry = self.items.get_nowait()
                except queue.Empty:
                    break
                if isinstance(entry, tuple):
                    self.budget.release(entry[2])

    def put(self, item, arrival: float) -> bool:
        """Queue an item, waiting while the queue is full or over its byte budget (the reader
        reads nothing meanwhile: TCP push-back); False once the chain has stopped (error) or the
        client is gone, so the reader can stop."""
        nbytes = item_bytes(item)

        def give_up() -> bool:  # pushed back, the reader reads nothing: ask the connection
            return not self.is_alive() or self.sender.check_peer()

        if not self.budget.acquire(nbytes, give_up):
            return False
        while self.is_alive():
            try:
                self.items.put((item, arrival, nbytes), timeout=0.5)
                return True
            except queue.Full:
                if self.sender.check_peer():
                    break
        self.budget.release(nbytes)
        return False

    def finish(self, abort: bool = False) -> None:
        """End the input: flush open slices (normal end), or drop them when `abort` (broken input)."""
        if self.is_alive():
            while True:
                try:
                    self.items.put(_ABORT if abort else _END, timeout=0.5)
                    break
                except queue.Full:
                    if not self.is_alive() or self.sender.check_peer():
                        break
        # All input is read: a reset is seen by polling the connection, and cancels the stream.
        while self.is_alive():
            self.join(WATCH_S)
            self.sender.check_peer()


def _linger_close(sock: socket.socket, drain_s: float = 2.0) -> None:
    """Close after a short drain of what the client still sends.

    Closing with unread input makes the kernel answer with a reset, and a client still busy
    sending would then fail before it reads our ERROR and CLOSE; draining lets it see them.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + drain_s
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass
    finally:
        sock.close()


@dataclass
class _Opening:
    """What the start of a conversation settled: the chain, the scan's context and checks, and a
    message read ahead (the first data message, or None)."""
    spec: ChainSpec
    context: StreamContext
    validator: AcquisitionValidator
    pending: object


@dataclass
class _Scan:
    """The chain of a conversation once data arrived, and whether its open slices are dropped
    (the client is probably gone) instead of flushed."""
    runner: _ChainRunner | None = None
    abort: bool = False


class ServerCounters:
    """Totals over the server's life (thread-safe): scans, images made and sent, scans whose
    client went away before their end (`scans_cancelled`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values = {"scans": 0, "images_made": 0, "images_sent": 0, "scans_cancelled": 0}

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self.values[name] += amount

    def __getitem__(self, name: str) -> int:
        return self.values[name]


class ReconServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 9002, repository: ChainRepository | None = None,
                 limits: protocol.Limits = protocol.Limits(), max_connections: int = 16,
                 io_timeout_s: float = 300.0, queue_size: int = 2048,
                 ssl_context: ssl.SSLContext | None = None, default_chain: str = "pisf",
                 max_slices_in_flight: int | None = None, connection_budget_bytes: int = DEFAULT_CONNECTION_BYTES,
                 server_budget_bytes: int = DEFAULT_SERVER_BYTES):
        """max_slices_in_flight: the process-wide bound on slices in the models at once
        (gadgets/inference_pool.ADMISSION; None keeps what the chains declared at warm-up).
        connection_budget_bytes, server_budget_bytes: received lines waiting for their chains, per
        connection and over all (gadgets/wire/budget.py); a reader over budget stops reading."""
        limit_blas_threads()
        if max_slices_in_flight is not None:
            inference_pool.ADMISSION.set_limit(max_slices_in_flight)
        self.counters = ServerCounters()
        self.repository = repository or ChainRepository.shared()
        # Names that clients send for "the default reconstruction": an OpenRecon console sends
        # `openrecon` (and its JSON may name a chain of ours in parameters.config); `pisf replay`
        # without -c sends `default`.
        self.aliases = {OPENRECON_NAME: default_chain, DEFAULT_NAME: default_chain}
        self.queries = QueryAnswers(self.repository, self.aliases)
        self.limits = limits
        self.io_timeout_s = io_timeout_s
        self.queue_size = queue_size
        self.budget = ByteBudget(server_budget_bytes, connection_budget_bytes)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.ssl_context = ssl_context  # None: plain TCP (the default); else every connection is TLS
        # refusals ("server busy") run in short threads of their own, at most this many at once
        self.refusals = threading.BoundedSemaphore(16)
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.address = self.listener.getsockname()[:2]
        self.stopping = threading.Event()
        self.sessions: set[threading.Thread] = set()

    # ---- accept loop ----
    def serve_forever(self) -> None:
        log.info("listening on %s:%d, chains %s", *self.address, ", ".join(self.repository.names()))
        self.listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            name = f"conn{next(_connection_ids)}"
            if not self.slots.acquire(blocking=False):
                log.warning("%s from %s refused: too many connections", name, peer)
                if self.refusals.acquire(blocking=False):
                    threading.Thread(target=self._refuse, args=(sock, name), name=f"{name}-refuse",
                                     daemon=True).start()
                else:
                    sock.close()  # a flood: no more threads for it, just drop
                continue
            thread = threading.Thread(target=self._session, args=(sock, name, peer), name=name, daemon=True)
            self.sessions.add(thread)
            thread.start()
        self.listener.close()

    def _secure(self, sock: socket.socket, timeout_s: float):
        """The TLS connection (handshake done, within timeout_s), or sock itself without TLS."""
        if self.ssl_context is None:
            return sock
        sock.settimeout(timeout_s)
        return TlsSocket(self.ssl_context, sock, server_side=True)

    def _refuse(self, sock: socket.socket, name: str) -> None:
        """Tell a connection over the limit that the server is busy (TEXT, CLOSE), then close it.

        Done off the accept loop, with a short drain before closing: closing with the client's
        config still unread would reset the connection and lose the message.
        """
        try:
            sock = self._secure(sock, min(self.io_timeout_s, 5.0))
            sock.settimeout(min(self.io_timeout_s, 5.0))
            _Sender(sock, name).close("server busy: too many concurrent connections, try again later")
            _linger_close(sock, drain_s=1.0)
        except (OSError, ValueError) as exc:
            log.warning("%s: refusing failed: %s", name, exc)
            sock.close()
        finally:
            self.refusals.release()

    def warm_up(self) -> None:
        """Create and warm up model sessions of every chain now, so no scan pays a cold start.

        A chain that cannot warm up (missing or corrupt model) is reported here and again, as a
        clear error, to any client that asks for it.
        """
        for name in self.repository.names():
            try:
                self.repository.load(name).warm_up()
            except Exception as exc:
                log.error("chain %s is not usable: %s", name, exc)

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="pisf-accept", daemon=True)
        thread.start()
        return thread

    def shutdown(self, wait_s: float = 60.0) -> None:
        """Stop accepting; let sessions in flight finish their slices (up to wait_s)."""
        self.stopping.set()
        deadline = time.monotonic() + wait_s
        for thread in list(self.sessions):
            thread.join(timeout=max(deadline - time.monotonic(), 0))

    # ---- one connection ----
    def _session(self, sock: socket.socket, name: str, peer) -> None:
        log.info("%s: connected from %s:%d", name, *peer[:2])
        raw = sock
        try:
            sock = self._secure(sock, self.io_timeout_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("%s: TLS handshake failed: %s", name, exc)
            sock.close()
            self.slots.release()
            self.sessions.discard(threading.current_thread())
            return
        sender = _Sender(sock, name, raw)
        try:
            sock.settimeout(self.io_timeout_s)
            self._converse(sock, sender)
        except Exception:  # never let a connection take the server down
            log.exception("%s: unexpected failure", name)
            sender.close("internal server error; see the server log")
        finally:
            try:
                _linger_close(sock)
            finally:
                self.slots.release()
                self.sessions.discard(threading.current_thread())
                log.info("%s: closed", name)
                memory.connection_ended(others_active=len(self.sessions))

    def _converse(self, sock: socket.socket, sender: _Sender) -> None:
        """One client's conversation: the opening (config, header, the client's JSON), the scan,
        then the end (open slices flushed or dropped, CLOSE with the first error)."""
        reader = protocol.MessageReader(protocol.socket_reader(sock), self.limits)

        def read():
            """The next message; QUERY messages (id 6) are answered with RESPONSE (id 7) on the way."""
            while True:
                message = reader.read()
                if not isinstance(message, protocol.Query):
                    return message
                self._answer(message, sender)

        scan = _Scan()
        error: str | None = None
        try:
            opening = self._open(read, sender, reader)
            if opening is None:
                return  # the client closed before any data, and was answered
            self._stream(read, sender, opening, scan)
        except protocol.PeerClosed as exc:
            if scan.runner is None and not exc.mid_frame:
                log.info("%s: client closed before sending data", sender.name)
            else:
                # The client stopped sending (it may still read: a half-close): say why, in case
                # it listens; a client that is gone makes the send fail harmlessly.
                error = (f"truncated frame: {exc}" if exc.mid_frame
                         else f"connection lost: {exc} before CLOSE (message id 4)")
                scan.abort = True
        except (protocol.ProtocolError, InputError, ConfigError) as exc:
            error = str(exc)
        except socket.timeout:
            error = f"no data from the client for {self.io_timeout_s:.0f} s"
        except OSError as exc:
            error = f"connection error: {exc}"
            sender.peer_gone = True
        self._end(scan, sender, error)
        if scan.runner is not None:
            runner = scan.runner
            self.counters.add(scans=1, images_made=runner.images_made, images_sent=runner.images_sent,
                              scans_cancelled=int(runner.cancelled is not None))

    def _open(self, read, sender: _Sender, reader: protocol.MessageReader) -> _Opening | None:
        """Config, header and an optional client JSON -> the session's chain and context; None
        when the client closed first (CLOSE already answered). From the header on, `reader` checks
        every acquisition's declared sizes against it before reading the payload."""
        config = read()
        if isinstance(config, protocol.Close):
            sender.close()  # nothing but queries (gadgetron_ismrmrd_client -Q), or nothing at all
            return None
        if not isinstance(config, (protocol.ConfigName, protocol.ConfigText)):
            raise InputError(f"expected a config (message id 1 or 2) first, got {type(config).__name__}")
        if isinstance(config, protocol.ConfigName) and not is_valid_name(config.name):
            raise ConfigError(f"config {config.name!r} is not a valid chain name")  # at once
        header_message = read()
        if isinstance(header_message, protocol.Close):
            # A dependency query (gadgetron_ismrmrd_client): config then CLOSE, no header.
            sender.close()
            return None
        if not isinstance(header_message, protocol.Header):
            raise InputError(f"expected the ISMRMRD header (message id 3) after the config, "
                             f"got {type(header_message).__name__}")
        header = parse_header(header_message.text)
        for warning in header_warnings(header_message.text):  # accepted here, refused by Gadgetron 4.7
            log.warning("%s: %s", sender.name, warning)
            sender.send(protocol.frame_text(warning))
        context = StreamContext(header=header, log=logging.getLogger(f"pisf.{sender.name}"),
                                cancelled=sender.gone, peer_gone=sender.check_peer)
        validator = AcquisitionValidator.for_header(header)
        reader.payload_check = validator.check_payload
        # FIRE/OpenRecon: a TEXT right after the header is the client's JSON config; it may
        # name the chain (parameters.config / customconfig) and sets stage parameters.
        try:
            pending = read()
        except protocol.PeerClosed as exc:
            if exc.mid_frame:
                raise
            pending = _NOTHING
        client_json = None
        if isinstance(pending, protocol.Text):
            if looks_like_json(pending.text):
                client_json = parse_client_json(pending.text)
            else:
                log.info("%s: client says: %s", sender.name, pending.text[:500])
            pending = None
        spec = self._select(config, client_json, sender, context)
        log.info("%s: chain %s, encoded %s, recon %s", sender.name, spec.name,
                 context.encoding.encoded_matrix, context.encoding.recon_matrix)
        if pending is _NOTHING:
            log.info("%s: client closed before sending data", sender.name)
            sender.close()
            return None
        return _Opening(spec, context, validator, pending)

    def _stream(self, read, sender: _Sender, opening: _Opening, scan: _Scan) -> None:
        """The scan's messages up to CLOSE: acquisitions are checked and fed to the chain (started
        on the first one, kept in `scan` so the end can flush it whatever happens)."""
        pending, received = opening.pending, 0
        while True:
            if pending is not None:
                message, pending = pending, None
            else:
                message = read()
            if isinstance(message, protocol.Close):
                break
            if isinstance(message, protocol.Text):
                log.info("%s: client says: %s", sender.name, message.text[:500])
                continue
            if isinstance(message, protocol.Error):
                raise InputError(f"client reported an error: {message.text}")
            if isinstance(message, ismrmrd.Waveform):
                continue  # physiology is not used by these chains
            if isinstance(message, ismrmrd.Image):
                raise InputError("an image (message id 1022) arrived where raw data was expected")
            if not isinstance(message, ismrmrd.Acquisition):
                raise InputError(f"unexpected {type(message).__name__} message during the scan")
            opening.validator.check_samples(message)  # its header: checked by the reader (payload_check)
            if scan.runner is None:
                scan.runner = _ChainRunner(opening.spec, opening.context, sender, self.queue_size,
                                           self.budget.connection())
                scan.runner.start()
            if not scan.runner.put(message, time.monotonic()):
                break  # the chain stopped with an error; it is reported by _end
            received += 1
        log.info("%s: %d acquisitions received", sender.name, received)

    @staticmethod
    def _end(scan: _Scan, sender: _Sender, error: str | None) -> None:
        runner = scan.runner
        if runner is not None:
            # Open slices are flushed (with a warning), also before an error is reported, while the
            # client can still receive them; for a client that is gone (or that stopped sending
            # mid-frame or without CLOSE) they are dropped instead of computed for nobody.
            runner.finish(abort=scan.abort or sender.peer_gone)
            runner.budget.close()  # the chain has ended: nothing it left queued is held any more
            error = error or runner.error
            if runner.error and runner.error != error:
                log.error("%s: %s", sender.name, runner.error)
            if runner.cancelled:
                log.warning("%s: stopped early (%s): %d images made, %d sent", sender.name, runner.cancelled,
                            runner.images_made, runner.images_sent)
        sender.close(error)

    def _answer(self, query: protocol.Query, sender: _Sender) -> None:
        try:
            answer = self.queries.answer(query.text)
        except KeyError as exc:
            raise InputError(exc.args[0]) from None
        log.info("%s: query %r answered", sender.name, query.text)
        sender.send(protocol.frame_response(query.correlation_id, answer))

    def _select(self, config, client_json, sender: _Sender, context: StreamContext) -> ChainSpec:
        """The session's chain with the client's JSON parameters applied (see session_config)."""
        selection = select_chain(self.repository,
                                 config.name if isinstance(config, protocol.ConfigName) else None,
                                 config.text if isinstance(config, protocol.ConfigText) else None,
                                 client_json, self.aliases)
        spec = selection.spec
        parameters = dict(client_json.parameters) if client_json is not None else {}
        if selection.openrecon and "fire" not in parameters and "image_finish.fire" not in parameters:
            parameters["fire"] = True  # an OpenRecon console reads FIRE-style images
        applied = apply_parameters(spec, parameters)
        context.parameters.update(parameters)
        if client_json is not None:
            log.info("%s: JSON config selects %r (chain %s); parameters applied %s", sender.name,
                     selection.requested, spec.name, applied.applied)
        if applied.not_in_chain:
            log.info("%s: parameters without a stage in chain %s: %s", sender.name, spec.name,
                     ", ".join(applied.not_in_chain))
        if applied.noted:
            log.info("%s: client notes %s", sender.name, applied.noted)
        ignored = client_json.ignored_top_level if client_json is not None else []
        warning = applied.warning(spec.name)
        if ignored:
            warning = ((warning + "; ") if warning else "WARNING: ") + \
                f"JSON config keys ignored (only 'version' and 'parameters' are read): {', '.join(ignored)}"
        if warning:
            log.warning("%s: %s", sender.name, warning)
            sender.send(protocol.frame_text(warning))
        return spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind: 127.0.0.1 admits local clients only, 0.0.0.0 every interface "
                             "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=9002, help="TCP port (9002 is what scanners and clients expect)")
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="directory of chain configs (default: the package's config/, or $PISF_CONFIG_DIR)")
    parser.add_argument("--default-chain", default=None,
                        help="chain run for clients that ask for the default reconstruction (OpenRecon's "
                             "'openrecon', `pisf replay` without -c: 'default'); default: pisf, or the first chain where there is no pisf")
    parser.add_argument("--max-connections", type=int, default=16, help="scans served at once; more are told 'server busy'")
    parser.add_argument("--io-timeout", type=float, default=300.0, help="seconds a client may stay silent")
    parser.add_argument("--max-slices-in-flight", type=int, default=None,
                        help="slices in the PISF models at once, all connections together (more wait; their "
                             "clients are pushed back); default: the chains' max_slices_in_flight "
                             f"(config/pisf.yaml), else {inference_pool.DEFAULT_MAX_SLICES_IN_FLIGHT}")
    parser.add_argument("--max-message-mb", type=float, default=256.0, help="largest frame accepted, MiB")
    parser.add_argument("--connection-budget-mib", type=float, default=DEFAULT_CONNECTION_BYTES / MIB,
                        help="received lines one connection may have waiting for its chain, MiB; over it the "
                             "server stops reading that socket (TCP push-back) (default: %(default).0f)")
    parser.add_argument("--server-budget-mib", type=float, default=DEFAULT_SERVER_BYTES / MIB,
                        help="the same over all connections together, MiB (default: %(default).0f)")
    parser.add_argument("--malloc-arenas", type=int, default=DEFAULT_MALLOC_ARENAS,
                        help="glibc malloc arenas the server's threads share (fewer keep less freed memory "
                             "after load; 0: glibc's default of 8 per core) (default: %(default)s)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): serve over TLS (default: plain TCP)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert (default: in the cert file)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        type=str.upper, help="server log verbosity")


def server_ssl_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def _fail(message: str) -> int:
    print(f"pisf serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.config_dir is not None and not args.config_dir.is_dir():
        return _fail(f"--config-dir {args.config_dir}: no such directory; give the directory of chain YAML "
                     f"files (the package's config/ when left out)")
    repository = ChainRepository(args.config_dir) if args.config_dir else ChainRepository.shared()
    chains = repository.names()
    if not chains:
        return _fail(f"no chains in {repository.directory}; put chain YAML files (with a 'stages' list) there, "
                     f"or leave out --config-dir for the package's config/")
    if args.default_chain is None:
        args.default_chain = "pisf" if "pisf" in chains else chains[0]
    elif args.default_chain not in chains:
        return _fail(f"--default-chain {args.default_chain!r} is not a chain in {repository.directory}; "
                     f"choose one of {', '.join(chains)}")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port {args.port} is not a TCP port; choose one in 0..65535 (0: any free port)")
    if args.max_connections < 1:
        return _fail(f"--max-connections {args.max_connections} would turn every scan away; give 1 or more")
    if not args.io_timeout > 0:
        return _fail(f"--io-timeout {args.io_timeout:g}: a client may not be silent for 0 s or less; give seconds "
                     f"above 0 (scanners pause between lines)")
    if not args.max_message_mb > 0:
        return _fail(f"--max-message-mb {args.max_message_mb:g} admits no frame; give MiB above 0")
    if args.max_slices_in_flight is not None and args.max_slices_in_flight < 1:
        return _fail(f"--max-slices-in-flight {args.max_slices_in_flight} admits no slice; give 1 or more")
    if args.connection_budget_mib <= 0 or args.server_budget_mib <= 0:
        return _fail(f"--connection-budget-mib {args.connection_budget_mib:g} / --server-budget-mib "
                     f"{args.server_budget_mib:g}: a budget of 0 or less admits no data; give both in MiB, above 0")
    if args.malloc_arenas < 0:
        return _fail(f"--malloc-arenas {args.malloc_arenas} is negative; give 0 (glibc's default) or more")
    memory.limit_arenas(args.malloc_arenas)  # before any connection thread allocates
    limits = protocol.Limits(max_message_bytes=int(args.max_message_mb * 1024 * 1024))
    if args.tls_key and not args.tls_cert:
        return _fail("--tls-key was given without --tls-cert; add --tls-cert CERT.pem (or leave out --tls-key)")
    try:
        ssl_context = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        return _fail(f"cannot load the TLS certificate/key ({args.tls_cert}, {args.tls_key or 'key in cert'}): "
                     f"{getattr(exc, 'strerror', None) or exc}; give a PEM certificate and its unencrypted PEM key "
                     f"(--tls-key, or in the certificate file)")
    try:
        server = ReconServer(args.host, args.port, repository, limits, args.max_connections, args.io_timeout,
                             ssl_context=ssl_context, default_chain=args.default_chain,
                             connection_budget_bytes=int(args.connection_budget_mib * MIB),
                             server_budget_bytes=int(args.server_budget_mib * MIB))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _fail(f"port {args.port} on {args.host} is already in use (another `pisf serve` or Gadgetron?); "
                         f"stop it or choose another with --port")
        if exc.errno == errno.EACCES:
            return _fail(f"no permission to listen on {args.host}:{args.port} (ports below 1024 need root); "
                         f"choose another with --port")
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            return _fail(f"cannot listen on {args.host!r}: not an address of this machine ({exc.strerror or exc}); "
                         f"give one of its addresses with --host (127.0.0.1 local only, 0.0.0.0 every interface)")
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; check --host and --port")
    if ssl_context is not None:
        log.info("TLS on: certificate %s", args.tls_cert)

    def stop(signum, _frame):
        log.info("signal %d: finishing connections in flight, then stopping", signum)
        server.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.warm_up()
    if args.max_slices_in_flight is not None:  # after the chains declared theirs: the option wins
        inference_pool.ADMISSION.set_limit(args.max_slices_in_flight)
    log.info("at most %d slices in the PISF models at once; lines waiting for chains: %.0f MiB per connection, "
             "%.0f MiB in all", inference_pool.ADMISSION.limit, args.connection_budget_mib, args.server_budget_mib)
    server.serve_forever()
    server.shutdown()
    return 0
