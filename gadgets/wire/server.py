"""The embedded inline recon server: ISMRMRD streaming protocol over TCP, one chain per connection.

Each connection gets a reader (this thread) and a chain thread joined by a bounded queue, so
lines keep arriving while earlier slices reconstruct and a slow chain pushes back on the
client through TCP instead of growing memory. Every failure ends with a TEXT naming the
problem, then CLOSE; slices already complete are reconstructed and sent before that.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import queue
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import ismrmrd

from .. import limit_blas_threads
from ..chain import ChainRepository, ChainSpec, ConfigError, parse_chain_text, run_stages
from ..context import InputError, StreamContext, parse_header
from ..items import Notice
from . import protocol
from .tls import TlsSocket
from .validate import AcquisitionValidator

log = logging.getLogger("pisf.server")
_END = object()
_ABORT = object()  # the client is gone: open slices are dropped, not flushed


_connection_ids = itertools.count(1)


class _StreamAborted(Exception):
    """Raised inside the chain's input when the client is gone: open slices are not flushed."""


class _Sender:
    """Thread-safe frame sender; after CLOSE (or a dead peer) further sends are dropped."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self.lock = threading.Lock()
        self.closed = False
        self.peer_gone = False

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

    def __init__(self, spec: ChainSpec, context: StreamContext, sender: _Sender, queue_size: int):
        super().__init__(name=f"{sender.name}-chain", daemon=True)
        self.spec, self.context, self.sender = spec, context, sender
        self.items: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: str | None = None
        self.images_sent = 0
        self.stages = spec.build(context)  # built in the reader thread: config errors surface at once

    def _incoming(self):
        while True:
            entry = self.items.get()
            if entry is _END:
                return
            if entry is _ABORT:
                raise _StreamAborted()
            item, arrival = entry
            self.context.last_arrival = arrival
            yield item

    def run(self) -> None:
        try:
            for output in run_stages(self.stages, self._incoming()):
                if self.sender.peer_gone:
                    # The client stopped receiving (write timeout) or vanished: computing the rest
                    # of the scan for nobody only holds memory and CPU; stop, and let the reader stop.
                    self.error = "the client stopped receiving images"
                    break
                if isinstance(output, ismrmrd.Image):
                    self.sender.send(protocol.frame_image(output))
                    self.images_sent += 1
                    latency = output.meta.get("PISF_LatencyMs", "?")
                    log.info("%s: image %d (slice %d, phase %d, repetition %d) sent, %s ms after its last line",
                             self.sender.name, output.image_index, output.slice, output.phase, output.repetition,
                             latency)
                elif isinstance(output, Notice):
                    log.log(output.level, "%s: %s", self.sender.name, output.text)
                    self.sender.send(protocol.frame_text(output.text))
        except _StreamAborted:
            pass  # everything queued before the abort was processed: complete slices were sent
        except InputError as exc:
            self.error = str(exc)
        except Exception as exc:  # a gadget failed: report it, keep the server alive
            log.exception("%s: chain %s failed", self.sender.name, self.spec.name)
            self.error = f"reconstruction failed in chain {self.spec.name!r}: {type(exc).__name__}: {exc}"
        finally:
            # Unblock the reader if it is waiting on a full queue.
            while True:
                try:
                    self.items.get_nowait()
                except queue.Empty:
                    break

    def put(self, item, arrival: float) -> bool:
        """Queue an item; False once the chain has stopped (error), so the reader can stop."""
        while self.is_alive():
            try:
                self.items.put((item, arrival), timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def finish(self, abort: bool = False) -> None:
        """End the input: flush open slices (normal end), or drop them when `abort` (broken input)."""
        if self.is_alive():
            while True:
                try:
                    self.items.put(_ABORT if abort else _END, timeout=0.5)
                    break
                except queue.Full:
                    if not self.is_alive():
                        break
        self.join()


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


class ReconServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 9002, repository: ChainRepository | None = None,
                 limits: protocol.Limits = protocol.Limits(), max_connections: int = 16,
                 io_timeout_s: float = 300.0, queue_size: int = 2048,
                 ssl_context: ssl.SSLContext | None = None):
        limit_blas_threads()
        self.repository = repository or ChainRepository.shared()
        self.limits = limits
        self.io_timeout_s = io_timeout_s
        self.queue_size = queue_size
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
        try:
            sock = self._secure(sock, self.io_timeout_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("%s: TLS handshake failed: %s", name, exc)
            sock.close()
            self.slots.release()
            self.sessions.discard(threading.current_thread())
            return
        sender = _Sender(sock, name)
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

    def _converse(self, sock: socket.socket, sender: _Sender) -> None:
        reader = protocol.MessageReader(protocol.socket_reader(sock), self.limits)
        runner: _ChainRunner | None = None
        error: str | None = None
        abort = False  # drop open slices instead of flushing them (the client is probably gone)
        try:
            config = reader.read()
            if isinstance(config, protocol.Close):
                sender.close()
                return
            if not isinstance(config, (protocol.ConfigName, protocol.ConfigText)):
                raise InputError(f"expected a config (message id 1 or 2) first, got {type(config).__name__}")
            header_message = reader.read()
            if isinstance(header_message, protocol.Close):
                # A dependency query (gadgetron_ismrmrd_client): config then CLOSE, no header.
                sender.close()
                return
            if not isinstance(header_message, protocol.Header):
                raise InputError(f"expected the ISMRMRD header (message id 3) after the config, "
                                 f"got {type(header_message).__name__}")
            spec = (self.repository.load(config.name) if isinstance(config, protocol.ConfigName)
                    else parse_chain_text(config.text, origin="CONFIG_TEXT", repository=self.repository))
            header = parse_header(header_message.text)
            context = StreamContext(header=header, log=logging.getLogger(f"pisf.{sender.name}"))
            validator = AcquisitionValidator.for_header(header)
            log.info("%s: chain %s, encoded %s, recon %s", sender.name, spec.name,
                     context.encoding.encoded_matrix, context.encoding.recon_matrix)
            received = 0
            while True:
                message = reader.read()
                if isinstance(message, protocol.Close):
                    break
                if isinstance(message, protocol.Text):
                    self._client_text(message.text, context, runner is None, sender.name)
                    continue
                if isinstance(message, protocol.Error):
                    raise InputError(f"client reported an error: {message.text}")
                if isinstance(message, ismrmrd.Waveform):
                    continue  # physiology is not used by these chains
                if isinstance(message, ismrmrd.Image):
                    raise InputError("an image (message id 1022) arrived where raw data was expected")
                if not isinstance(message, ismrmrd.Acquisition):
                    raise InputError(f"unexpected {type(message).__name__} message during the scan")
                validator.check(message)
                if runner is None:
                    runner = _ChainRunner(spec, context, sender, self.queue_size)
                    runner.start()
                if not runner.put(message, time.monotonic()):
                    break  # the chain stopped with an error; it is reported below
                received += 1
            log.info("%s: %d acquisitions received", sender.name, received)
        except protocol.PeerClosed as exc:
            if runner is None and not exc.mid_frame:
                log.info("%s: client closed before sending data", sender.name)
            else:
                # The client stopped sending (it may still read: a half-close): say why, in case
                # it listens; a client that is gone makes the send fail harmlessly.
                error = (f"truncated frame: {exc}" if exc.mid_frame
                         else f"connection lost: {exc} before CLOSE (message id 4)")
                abort = True
        except (protocol.ProtocolError, InputError, ConfigError) as exc:
            error = str(exc)
        except socket.timeout:
            error = f"no data from the client for {self.io_timeout_s:.0f} s"
        except OSError as exc:
            error = f"connection error: {exc}"
            sender.peer_gone = True
        if runner is not None:
            # Open slices are flushed (with a warning), also before an error is reported, while the
            # client can still receive them; for a client that is gone (or that stopped sending
            # mid-frame or without CLOSE) they are dropped instead of computed for nobody.
            runner.finish(abort=abort or sender.peer_gone)
            error = error or runner.error
            if runner.error and runner.error != error:
                log.error("%s: %s", sender.name, runner.error)
        sender.close(error)

    @staticmethod
    def _client_text(text: str, context: StreamContext, before_data: bool, name: str) -> None:
        """FIRE-style clients may send JSON parameters as TEXT right after the header."""
        if before_data:
            try:
                parameters = json.loads(text)
            except ValueError:
                parameters = None
            if isinstance(parameters, dict):
                context.parameters.update(parameters)
                log.info("%s: client parameters %s", name, sorted(parameters))
                return
        log.info("%s: client says: %s", name, text[:500])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="directory of chain configs (default: the package's config/)")
    parser.add_argument("--max-connections", type=int, default=16)
    parser.add_argument("--io-timeout", type=float, default=300.0, help="seconds a client may stay silent")
    parser.add_argument("--max-message-mb", type=float, default=256.0, help="largest frame accepted")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): serve over TLS (default: plain TCP)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert (default: in the cert file)")
    parser.add_argument("--log-level", default="INFO")


def server_ssl_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repository = ChainRepository(args.config_dir) if args.config_dir else ChainRepository.shared()
    limits = protocol.Limits(max_message_bytes=int(args.max_message_mb * 1024 * 1024))
    if args.tls_key and not args.tls_cert:
        log.error("--tls-key needs --tls-cert")
        return 2
    ssl_context = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = ReconServer(args.host, args.port, repository, limits, args.max_connections, args.io_timeout,
                         ssl_context=ssl_context)
    if ssl_context is not None:
        log.info("TLS on: certificate %s", args.tls_cert)

    def stop(signum, _frame):
        log.info("signal %d: finishing connections in flight, then stopping", signum)
        server.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.warm_up()
    server.serve_forever()
    server.shutdown()
    return 0
