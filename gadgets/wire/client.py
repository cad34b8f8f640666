"""`pisf replay`: stream an ISMRMRD raw file to a recon server like a scanner, collect the images.

Images are written as ISMRMRD image groups (as gadgetron_ismrmrd_client does) and as PNG
previews; every TEXT from the server is printed; per-image latency is measured from sending
the last line of a slice to receiving its image.
"""
from __future__ import annotations

import argparse
import datetime
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import numpy as np

from . import protocol
from ..items import SliceKey
from .tls import TlsSocket

TICK_S = 2.5e-3  # acquisition_time_stamp unit on Siemens and in ISMRMRD practice


@dataclass
class ReceivedImage:
    image: ismrmrd.Image
    latency_s: float | None


@dataclass
class ReplayResult:
    images: list[ReceivedImage] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)  # RESPONSE (id 7) texts, answers to queries
    closed: bool = False
    acquisitions_sent: int = 0
    send_seconds: float = 0.0
    error: str | None = None

    @property
    def errors(self) -> list[str]:
        return [t for t in self.texts if t.startswith("ERROR")]

    def latencies(self) -> list[float]:
        return [r.latency_s for r in self.images if r.latency_s is not None]


# HDF5 file objects opened and closed from several threads at once crash the process (seen as a
# segfault with concurrent replays); file access is rare and short, so it is serialised.
_hdf5_lock = threading.Lock()


def read_raw(path: Path | str, group: str = "dataset"):
    """(header text, acquisitions) of an ISMRMRD HDF5 file, opened read-only."""
    with _hdf5_lock:
        try:
            dataset = ismrmrd.Dataset(str(path), group, create_if_needed=False, mode="r")
        except TypeError:  # ismrmrd < 1.15 (the Gadgetron image's 1.14) has no `mode`
            dataset = ismrmrd.Dataset(str(path), group, create_if_needed=False)
        try:
            header = dataset.read_xml_header()
            header = header.decode("utf-8") if isinstance(header, bytes) else header
            acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
        finally:
            dataset.close()
            del dataset  # its __del__ closes again: keep that inside the lock too
    return header, acquisitions


class _Receiver(threading.Thread):
    def __init__(self, sock: socket.socket, result: ReplayResult, sent_times: dict, verbose: bool):
        super().__init__(name="replay-receiver", daemon=True)
        self.sock, self.result, self.sent_times, self.verbose = sock, result, sent_times, verbose

    def run(self) -> None:
        reader = protocol.MessageReader(protocol.socket_reader(self.sock))
        try:
            while True:
                message = reader.read()
                now = time.monotonic()
                if isinstance(message, ismrmrd.Image):
                    key = SliceKey(message.slice, message.contrast, message.phase, message.repetition, message.set)
                    sent = self.sent_times.get(key)
                    latency = now - sent if sent is not None else None
                    self.result.images.append(ReceivedImage(message, latency))
                    if self.verbose:
                        shown = f"{latency * 1e3:7.1f} ms" if latency is not None else "      n/a"
                        print(f"image {message.image_index:4d}  series {message.image_series_index}  {key}  "
                              f"{tuple(message.matrix_size)}  latency {shown}", flush=True)
                elif isinstance(message, (protocol.Text, protocol.Error)):
                    self.result.texts.append(message.text)
                    if self.verbose:
                        print(f"server: {message.text}", flush=True)
                elif isinstance(message, protocol.Response):
                    self.result.responses.append(message.text)
                elif isinstance(message, protocol.Close):
                    self.result.closed = True
                    return
                else:
                    self.result.error = f"unexpected message from server: {type(message).__name__}"
                    return
        except protocol.PeerClosed:
            if not self.result.closed:
                self.result.error = "server closed the connection without CLOSE"
        except (protocol.ProtocolError, OSError) as exc:
            self.result.error = f"receiving failed: {exc}"


def replay(raw_path: Path | str, host: str = "127.0.0.1", port: int = 9002, config: str = "zerofill",
           config_text: str | None = None, realtime: bool = False, parameters: str | None = None,
           verbose: bool = False, progress: bool = False, timeout_s: float = 600.0,
           header_text: str | None = None, acquisitions: list | None = None, tls: bool = False,
           tls_ca: Path | str | None = None) -> ReplayResult:
    """Stream one raw file (or given header+acquisitions) and return what came back.

    `tls`: connect over TLS, verifying the server's certificate (and host name) against `tls_ca`
    (a PEM file) or, without it, the system's trusted CAs.
    """
    if acquisitions is None:
        header_text, acquisitions = read_raw(raw_path)
    result = ReplayResult()
    sent_times: dict[SliceKey, float] = {}
    sock = socket.create_connection((host, port), timeout=timeout_s)
    if tls:
        try:
            sock = TlsSocket(client_ssl_context(tls_ca), sock, server_side=False, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    with sock:
        receiver = _Receiver(sock, result, sent_times, verbose)
        receiver.start()
        send = sock.sendall
        send(protocol.frame_config_text(config_text) if config_text is not None
             else protocol.frame_config_name(config))
        send(protocol.frame_header(header_text))
        if parameters is not None:
            send(protocol.frame_text(parameters))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(acquisitions), unit="line", desc="streaming", file=sys.stderr)
        start = time.monotonic()
        first_stamp = None
        try:
            for acquisition in acquisitions:
                if realtime:
                    stamp = acquisition.acquisition_time_stamp
                    first_stamp = stamp if first_stamp is None else first_stamp
                    delay = (stamp - first_stamp) * TICK_S - (time.monotonic() - start)
                    if delay > 0:
                        time.sleep(delay)
                send(protocol.frame_acquisition(acquisition))
                key = SliceKey.of(acquisition.idx)
                if not acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                    sent_times[key] = time.monotonic()  # the last line sent so far for this slice
                result.acquisitions_sent += 1
                if bar is not None:
                    bar.update()
            send(protocol.frame_close())
        except OSError as exc:
            result.error = f"sending failed after {result.acquisitions_sent} acquisitions: {exc}"
        finally:
            if bar is not None:
                bar.close()
        result.send_seconds = time.monotonic() - start
        receiver.join(timeout_s)
    return result


def client_ssl_context(ca: Path | str | None = None) -> ssl.SSLContext:
    """Verifies the server certificate and host name (against `ca`, else the system CAs)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def write_images(result: ReplayResult, out_path: Path | str, group: str | None = None) -> str:
    """Append received images as ISMRMRD image groups `<group>/image_<series>`; returns the group."""
    group = group or datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with _hdf5_lock:
        dataset = ismrmrd.Dataset(str(out_path), group, create_if_needed=True)
        try:
            for received in result.images:
                dataset.append_image(f"image_{received.image.image_series_index}", received.image)
        finally:
            dataset.close()
            del dataset
    return group


def window(image: ismrmrd.Image) -> tuple[float, float]:
    """(low, high) display range from the image's window meta, else from percentiles."""
    data = np.asarray(image.data, dtype=np.float32)
    try:
        centre, width = float(image.meta["WindowCenter"]), float(image.meta["WindowWidth"])
        return centre - width / 2, centre + width / 2
    except (KeyError, ValueError, TypeError):
        low, high = np.percentile(data, [1, 99.5])
        return float(low), float(max(high, low + 1e-6))


def write_pngs(result: ReplayResult, directory: Path | str) -> list[Path]:
    from skimage.io import imsave

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for received in result.images:
        image = received.image
        low, high = window(image)
        data = np.asarray(image.data, dtype=np.float32)[0]  # [z, y, x]
        for z, plane in enumerate(data):
            pixels = np.clip((plane - low) / (high - low), 0, 1)
            name = (f"series{image.image_series_index:02d}_slice{image.slice:03d}_contrast{image.contrast}"
                    f"_phase{image.phase:03d}_rep{image.repetition:03d}_set{image.set}"
                    + (f"_z{z:03d}" if data.shape[0] > 1 else "") + ".png")
            path = directory / name
            imsave(path, (pixels * 255).astype(np.uint8), check_contrast=False)
            written.append(path)
    return written


def summarise_latency(latencies: list[float]) -> str:
    if not latencies:
        return "no latency measured"
    ms = np.array(latencies) * 1e3
    return (f"latency over {len(ms)} images: p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, "
            f"max {ms.max():.1f} ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw", type=Path, help="ISMRMRD HDF5 raw file (group 'dataset')")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--config", default="zerofill", help="chain name sent as CONFIG_FILE (id 1)")
    parser.add_argument("--config-file", type=Path, help="send this file's text as CONFIG_TEXT (id 2) instead")
    parser.add_argument("--parameters", help="JSON text sent as TEXT after the header (FIRE style)")
    parser.add_argument("--out", type=Path, help="write received images to this ISMRMRD HDF5 file")
    parser.add_argument("--out-group", help="image group name (default: current date and time)")
    parser.add_argument("--png", type=Path, help="write PNG previews into this directory")
    parser.add_argument("--dicom", type=Path, help="write the images as DICOM MR series into this directory")
    parser.add_argument("--realtime", action="store_true", help="pace lines by their acquisition time stamps")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--tls", action="store_true", help="connect over TLS (server started with --tls-cert)")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA certificate to verify the server with (implies --tls)")


def run(args: argparse.Namespace) -> int:
    config_text = args.config_file.read_text() if args.config_file else None
    result = replay(args.raw, args.host, args.port, args.config, config_text, args.realtime, args.parameters,
                    verbose=True, progress=True, timeout_s=args.timeout,
                    tls=args.tls or args.tls_ca is not None, tls_ca=args.tls_ca)
    print(f"sent {result.acquisitions_sent} acquisitions in {result.send_seconds:.2f} s, "
          f"received {len(result.images)} images")
    print(summarise_latency(result.latencies()))
    if args.out and result.images:
        group = write_images(result, args.out, args.out_group)
        print(f"images written to {args.out} group '{group}'")
    if args.png and result.images:
        print(f"{len(write_pngs(result, args.png))} PNG previews in {args.png}")
    if getattr(args, "dicom", None) and result.images:
        from ..context import parse_header
        from ..formats.dicom import write_dicom

        paths = write_dicom([r.image for r in result.images], args.dicom,
                            header=parse_header(read_raw(args.raw)[0]))
        print(f"{len(paths)} DICOM files in {args.dicom}")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    return 1 if (result.error or result.errors or not result.closed) else 0
