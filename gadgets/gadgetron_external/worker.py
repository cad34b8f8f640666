"""`pisf gadgetron-worker`: a persistent process for Gadgetron's `<external><connect .../>`.

With `<execute>`, Gadgetron starts a fresh Python process per scan (imports and model load every
time). With `<connect port="18000" address="..."/>` Gadgetron connects to this process instead:
it loads and warms the chain's model once, then serves every connection (each one a scan, each in
its own thread, sharing the onnxruntime session) with the same targets as
gadgets.gadgetron_external.targets:

    pisf gadgetron-worker --port 18000 --chain pisf            # acquisitions in
    pisf gadgetron-worker --port 18001 --chain pisf --buffers  # ReconData (BucketToBuffer) in

Input type can also be left to the data: without --buffers a scan whose first message is a
ReconData is handled as buffers. The `<configuration>` of the chain (properties `chain`,
`gadget.parameter`) applies per connection, as with `<execute>`; in a distributed chain Gadgetron
forwards no `<configuration>` to the workers, so their properties go on this command line.

A connection that fails gets ERROR and CLOSE and is closed; one that sends no config and header
within --opening-timeout seconds, or that Gadgetron closes, ends without holding a thread. The
worker itself carries on serving.
"""
from __future__ import annotations

import argparse
import logging
import socket
import threading

log = logging.getLogger("pisf.worker")


class _Peeked:
    """A gadgetron-python connection whose first item was read to decide the input type."""

    def __init__(self, connection, first, message_id):
        self._connection, self._first, self._mid = connection, first, message_id

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def __iter__(self):
        if self._first is not None:
            yield self._first
        yield from self._connection


def serve_connection(sock: socket.socket, chain: str, buffers: bool | None,
                     defaults: dict[str, str] | None = None, opening_timeout_s: float = 60.0) -> None:
    """One Gadgetron connection: config, header, items, CLOSE; on any failure ERROR, CLOSE and the
    socket closed, so neither Gadgetron nor this thread waits. The worker itself carries on."""
    from gadgetron.external.connection import Connection

    from ..context import Encoding
    from .targets import EofSafeSocket, run_chain, send_error_and_close

    # Gadgetron sends config and header as soon as it connects: a peer that does not is cut off
    # after opening_timeout_s instead of holding a thread (gadgetron-python would wait forever).
    guarded = EofSafeSocket(sock, opening_timeout=opening_timeout_s)
    try:
        connection = Connection(guarded)
    except Exception as exc:  # closed, timed out, or a config/header that does not parse
        log.warning("connection ended before its config and header were read: %s: %s", type(exc).__name__, exc)
        send_error_and_close(sock, f"pisf gadgetron-worker: no usable config and header: {type(exc).__name__}: {exc}")
        return
    guarded.opened()
    try:
        # a header no chain can use fails now, not when the first item arrives (the peek below waits for it)
        Encoding.from_header(connection.header)
        if buffers is None:
            try:
                mid, first = connection.next()
            except StopIteration:
                connection.socket.close()  # config + header + CLOSE: nothing to reconstruct
                return
            buffers = mid == 1023
            connection = _Peeked(connection, first, mid)
    except Exception as exc:
        log.warning("connection failed before the scan: %s: %s", type(exc).__name__, exc)
        send_error_and_close(sock, f"pisf gadgetron-worker: {type(exc).__name__}: {exc}")
        return
    try:
        run_chain(connection, chain, buffers=buffers, defaults=defaults)
    except Exception:
        return  # logged, and sent to Gadgetron as ERROR + CLOSE by run_chain
    try:
        connection.socket.close()  # CLOSE, as gadgetron-python's own `with` block would send
    except OSError as exc:
        log.warning("could not send CLOSE: %s", exc)


def make_listener(host: str, port: int) -> socket.socket:
    """IPv6 dual-stack where available (gadgetron-python listens on IPv6; Gadgetron resolves
    `localhost` either way), else IPv4."""
    if not host and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=16)
    return socket.create_server((host or "0.0.0.0", port), backlog=16)


def serve(port: int, chain: str = "pisf", host: str = "", buffers: bool | None = None,
          max_connections: int | None = None, ready: threading.Event | None = None,
          listener: socket.socket | None = None, defaults: dict[str, str] | None = None,
          opening_timeout_s: float = 60.0) -> None:
    from ..chain import ChainRepository, apply_overrides

    defaults = dict(defaults or {})
    spec = ChainRepository.shared().load(defaults.get("chain", chain))
    apply_overrides(spec, defaults)
    spec.warm_up()  # model sessions load once, here, not per scan
    listener = listener or make_listener(host, port)
    log.info("pisf gadgetron-worker: chain %s on port %d", chain, listener.getsockname()[1])
    print(f"pisf gadgetron-worker: chain {chain} warmed up, listening on port {listener.getsockname()[1]}",
          flush=True)
    if ready is not None:
        ready.set()
    served, threads = 0, []
    try:
        while max_connections is None or served < max_connections:
            sock, address = listener.accept()
            log.info("connection from %s", address)
            thread = threading.Thread(target=serve_connection, args=(sock, chain, buffers, defaults, opening_timeout_s),
                                      name=f"gadgetron-connection-{served}", daemon=True)
            thread.start()
            threads.append(thread)
            threads = [t for t in threads if t.is_alive()]
            served += 1
    finally:
        listener.close()
        for thread in threads:
            thread.join(60)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=18000, help="port of <connect port=...> in the chain")
    parser.add_argument("--host", default="", help="address to bind (default: all, IPv4 and IPv6)")
    parser.add_argument("--chain", default="pisf", help="chain to run (the config's `chain` property wins)")
    input_type = parser.add_mutually_exclusive_group()
    input_type.add_argument("--buffers", dest="buffers", action="store_const", const=True, default=None,
                            help="input is ReconData (after BucketToBuffer)")
    input_type.add_argument("--acquisitions", dest="buffers", action="store_const", const=False,
                            help="input is acquisitions")
    parser.add_argument("--property", action="append", default=[], metavar="NAME=VALUE",
                        help="default chain property, e.g. pisf_recon.model=/models/x.onnx (a connection's "
                             "<configuration> overrides it); the model of these defaults is loaded at start")
    parser.add_argument("--opening-timeout", type=float, default=60.0,
                        help="seconds a connection may take to send its config and header before it is cut off")
    parser.add_argument("--max-connections", type=int, default=None, help="exit after this many (tests)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s [pisf worker] %(message)s")
    try:
        defaults = {}
        for entry in args.property:
            name, separator, value = entry.partition("=")
            if not separator or not name:
                raise SystemExit(f"--property {entry!r}: expected NAME=VALUE")
            defaults[name.strip()] = value
        serve(args.port, args.chain, args.host, args.buffers, args.max_connections, defaults=defaults,
              opening_timeout_s=args.opening_timeout)
    except KeyboardInterrupt:
        pass
    return 0
