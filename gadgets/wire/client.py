"""The streaming client behind `pisf replay` (front end: tools/replay.py): send an ISMRMRD raw file
to a recon server like a scanner, collect what comes back.

Images are written as ISMRMRD image arrays (as gadgetron_ismrmrd_client does) and as PNG
previews; every TEXT from the server is kept; per-image latency is measured from sending the
last line of a slice to receiving its image.
"""
from __future__ import annotations

import contextlib
import datetime
import re
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
from .session_config import DEFAULT_NAME as DEFAULT_CHAIN  # the server's default chain, by name
from .tls import TlsSocket

TICK_S = 2.5e-3  # acquisition_time_stamp unit on Siemens and in ISMRMRD practice
WRITTEN_ATTRIBUTE = "pisf_written_utc"  # image group attribute: ISO time write_images last wrote it


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
    acquisitions_total: int = 0
    stopped_at_error: bool = False  # sending stopped early because the server sent an ERROR
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


class RawFileError(ValueError):
    """The file cannot be replayed; the message says why in one line."""


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C during a replay; `result` holds what had arrived (the connection is closed)."""

    def __init__(self, result: "ReplayResult"):
        super().__init__()
        self.result = result


def raw_groups(path: Path | str) -> list[str]:
    """Groups of an HDF5 file that hold ISMRMRD raw data (`xml` and `data`), top level first."""
    import h5py

    found = []
    with _hdf5_lock, h5py.File(path, "r") as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "xml" in obj and "data" in obj:
                found.append(name)
        h5.visititems(visit)
    return sorted(found, key=lambda name: (name.count("/"), name))


def resolve_raw_group(path: Path | str, group: str | None = None) -> str:
    """The raw data group to stream: `group` if given (checked), else `dataset`, else the only one.

    Raises RawFileError (missing file, not HDF5, no ISMRMRD raw data, ambiguous or unknown group).
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise RawFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise RawFileError(f"{path} is a directory; give an ISMRMRD raw data file (.h5)")
    try:
        is_hdf5 = h5py.is_hdf5(str(path))
    except OSError as exc:
        raise RawFileError(f"{path}: cannot be read ({exc}); check its permissions") from None
    if not is_hdf5:
        with open(path, "rb") as handle:
            start = handle.read(512)
        kind = "a text file" if start and all(32 <= b < 127 or b in (9, 10, 13) for b in start) else "not HDF5"
        raise RawFileError(f"{path} is {kind}, not an ISMRMRD raw data file (HDF5 with a group holding "
                           f"'xml' and 'data')")
    try:
        groups = raw_groups(path)
    except OSError as exc:  # HDF5 signature fine, content not (a cut-off copy, a damaged file)
        truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        what = (f"truncated ({truncated[1]} of {truncated[2]} bytes)" if truncated
                else f"a damaged HDF5 file ({exc})")
        raise RawFileError(f"{path} is {what}; copy it again, or rerun what wrote it") from None
    if group is not None:
        group = group.strip("/")
        if group in groups:
            return group
        raise RawFileError(f"{path} has no ISMRMRD raw data in group {group!r}; "
                           + (f"raw data groups: {', '.join(groups)}" if groups else "it holds none"))
    if not groups:
        with _hdf5_lock, h5py.File(path, "r") as h5:
            top = ", ".join(h5.keys()) or "none"
        raise RawFileError(f"{path} is HDF5 but holds no ISMRMRD raw data (no group with 'xml' and 'data'; "
                           f"top-level entries: {top})")
    if "dataset" in groups or len(groups) == 1:
        return "dataset" if "dataset" in groups else groups[0]
    raise RawFileError(f"{path} holds raw data in several groups ({', '.join(groups)}); choose one with -g")


def read_raw(path: Path | str, group: str | None = "dataset"):
    """(header text, acquisitions) of an ISMRMRD HDF5 file, opened read-only.

    `group=None` picks the group as resolve_raw_group does (and checks the file first).
    """
    if group is None:
        group = resolve_raw_group(path)
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


def expected_images(acquisitions) -> int:
    """Images a one-series chain returns: one per (slice, contrast, phase, repetition, set) with data."""
    keys = {SliceKey.of(a.idx) for a in acquisitions
            if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            and not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)}
    return len(keys)


class _Receiver(threading.Thread):
    def __init__(self, sock: socket.socket, result: ReplayResult, sent_times: dict, verbose: bool, bar=None):
        super().__init__(name="replay-receiver", daemon=True)
        self.sock, self.result, self.sent_times, self.verbose = sock, result, sent_times, verbose
        self.bar = bar  # progress of images received (of expected)
        self.refused = threading.Event()  # the server sent an ERROR: it closes the scan, stop sending
        self.expected = bar.total if bar is not None else 0  # images per series
        self.series_seen: set[int] = set()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

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
                    if self.bar is not None:
                        # A chain that sends several series (pisf_compare: PISF and GRAPPA) sends the
                        # expected count per series: the total follows the series seen so far, so it
                        # is right from the first image of each series on instead of growing with
                        # every image past the first series' count.
                        self.series_seen.add(message.image_series_index)
                        self.bar.total = max(self.expected * len(self.series_seen), len(self.result.images))
                        self.bar.update()
                    if self.verbose:
                        shown = f"{latency * 1e3:7.1f} ms" if latency is not None else "      n/a"
                        self._print(f"image {message.image_index:4d}  series {message.image_series_index}  {key}  "
                                    f"{tuple(message.matrix_size)}  latency {shown}")
                elif isinstance(message, (protocol.Text, protocol.Error)):
                    text = message.text
                    if isinstance(message, protocol.Error) and not text.startswith("ERROR"):
                        text = f"ERROR: {text}"
                    self.result.texts.append(text)
                    if text.startswith("ERROR"):
                        self.refused.set()  # reported once by the caller, not printed here as well
                    elif self.verbose:
                        self._print(f"server: {text}")
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
           tls_ca: Path | str | None = None, queries: tuple[str, ...] = ()) -> ReplayResult:
    """Stream one raw file (or given header+acquisitions) and return what came back.

    `tls`: connect over TLS, verifying the server's certificate (and host name) against `tls_ca`
    (a PEM file) or, without it, the system's trusted CAs. `queries` are sent first as QUERY
    messages; their answers land in `result.responses`. Sending stops at the server's first
    ERROR (it ends the scan). Ctrl-C closes the connection and raises ReplayInterrupted with what
    had arrived.
    """
    if acquisitions is None:
        header_text, acquisitions = read_raw(raw_path)
    result = ReplayResult(acquisitions_total=len(acquisitions))
    sent_times: dict[SliceKey, float] = {}
    sock = socket.create_connection((host, port), timeout=timeout_s)  # OSError (refused, ...) to the caller
    if tls:
        try:
            sock = TlsSocket(client_ssl_context(tls_ca), sock, server_side=False, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    bars = []
    if progress:
        from tqdm import tqdm
        bars.append(tqdm(total=len(acquisitions), unit="line", desc="streaming", file=sys.stderr, position=0))
        bars.append(tqdm(total=max(expected_images(acquisitions), 1), unit="image", desc="images   ",
                         file=sys.stderr, position=1))
    receiver = _Receiver(sock, result, sent_times, verbose, bars[1] if bars else None)
    try:
        with sock:
            receiver.start()
            try:
                _send_scan(sock.sendall, result, receiver.refused, config, config_text, header_text, parameters,
                           queries, acquisitions, realtime, sent_times, bars[0] if bars else None)
                if bars:
                    bars[0].close()  # sent; the images bar goes on while the last slices reconstruct
                receiver.join(timeout_s)
            except KeyboardInterrupt:
                # Leave at once: shutting the socket down wakes the receiver, which ends within moments.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                receiver.join(1.0)
                result.images = list(result.images)  # a snapshot: the receiver adds nothing more
                raise ReplayInterrupted(result) from None
            if receiver.is_alive() and result.error is None:
                result.error = f"no CLOSE from the server within {timeout_s:.0f} s after the last line"
    finally:
        for bar in bars:
            bar.close()
    if result.stopped_at_error and result.error and result.error.startswith("sending failed"):
        result.error = None  # the server closed after its ERROR: that ERROR is the news, not the broken pipe
    return result


def _send_scan(send, result: ReplayResult, refused: threading.Event, config, config_text, header_text,
               parameters, queries, acquisitions, realtime, sent_times, bar) -> None:
    """Queries, config, header, the client's JSON, the acquisitions (paced with `realtime`), CLOSE;
    stops at the server's first ERROR (without CLOSE: the server has closed the scan itself)."""
    start = time.monotonic()
    first_stamp = None
    try:
        for number, query in enumerate(queries, 1):
            send(protocol.frame_query(query, number))
        send(protocol.frame_config_text(config_text) if config_text is not None
             else protocol.frame_config_name(config))
        send(protocol.frame_header(header_text))
        if parameters is not None:
            send(protocol.frame_text(parameters))
        for acquisition in acquisitions:
            if refused.is_set():
                result.stopped_at_error = True
                return
            if realtime:
                stamp = acquisition.acquisition_time_stamp
                first_stamp = stamp if first_stamp is None else first_stamp
                delay = (stamp - first_stamp) * TICK_S - (time.monotonic() - start)
                if delay > 0 and refused.wait(delay):
                    result.stopped_at_error = True
                    return
            send(protocol.frame_acquisition(acquisition))
            key = SliceKey.of(acquisition.idx)
            if not acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                sent_times[key] = time.monotonic()  # the last line sent so far for this slice
            result.acquisitions_sent += 1
            if bar is not None:
                bar.update()
        send(protocol.frame_close())
    except OSError as exc:
        result.stopped_at_error = refused.is_set()
        result.error = f"sending failed after {result.acquisitions_sent} acquisitions: {exc}"
    finally:
        result.send_seconds = time.monotonic() - start


def client_ssl_context(ca: Path | str | None = None) -> ssl.SSLContext:
    """Verifies the server certificate and host name (against `ca`, else the system CAs)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def default_group_name(prefix: str = "pisf") -> str:
    """A shell-friendly output group name: `pisf_20261122_101500` (no spaces, no colons)."""
    return f"{prefix}_{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}"


def _existing_image_arrays(out_path: Path, group: str) -> dict[str, tuple]:
    """image array name -> (shape of one image, dtype) already in `out_path`/`group`."""
    import h5py

    if not out_path.exists():
        return {}
    with h5py.File(out_path, "r") as h5:
        node = h5.get(group)
        if not isinstance(node, h5py.Group):
            return {}
        return {name: (tuple(node[name]["data"].shape[1:]), node[name]["data"].dtype)
                for name in node if isinstance(node[name], h5py.Group) and "data" in node[name]}


def plan_image_arrays(images: list[ismrmrd.Image], existing: dict[str, tuple] | None = None) -> dict[str, list]:
    """Image array name -> images, so that every array holds one shape and data type.

    `image_<series>` (as gadgetron_ismrmrd_client and FIRE's client name them) takes the series'
    first shape; images of another shape in the same series (foreign servers send them: a
    localiser, a resized map) go to `image_<series>_<x>x<y>x<z>[_<dtype>]` instead of failing the file.
    """
    existing = dict(existing or {})
    plan: dict[str, list] = {}
    for image in images:
        signature = (tuple(image.data.shape), np.dtype(image.data.dtype))
        base = f"image_{image.image_series_index}"
        x, y, z = (int(v) for v in image.matrix_size)
        candidates = [base, f"{base}_{x}x{y}x{z}", f"{base}_{x}x{y}x{z}_{signature[1].name}"]
        for name in candidates:
            if existing.setdefault(name, signature) == signature:
                plan.setdefault(name, []).append(image)
                break
        else:  # same size and dtype but another channel count, say: number it
            number = 2
            while existing.setdefault(f"{base}_{number}", signature) != signature:
                number += 1
            plan.setdefault(f"{base}_{number}", []).append(image)
    return plan


def write_images(result: ReplayResult, out_path: Path | str, group: str | None = None,
                 arrays: list[str] | None = None) -> str:
    """Append received images as ISMRMRD image arrays `<group>/image_<series>`; returns the group.

    `arrays`, when given, receives the array names written. Images of a series that differ in shape go to arrays of their
    own (see plan_image_arrays): nothing received is dropped and no array is left half written.
    """
    out_path = Path(out_path)
    group = group or default_group_name()
    with _hdf5_lock:
        plan = plan_image_arrays([r.image for r in result.images], _existing_image_arrays(out_path, group))
        dataset = ismrmrd.Dataset(str(out_path), group, create_if_needed=True)
        try:
            for name, images in plan.items():
                for image in images:
                    dataset.append_image(name, image)
        finally:
            dataset.close()
            del dataset
        import h5py

        with h5py.File(out_path, "a") as h5:  # when it was written: `pisf dicom` takes the latest group
            h5[group].attrs[WRITTEN_ATTRIBUTE] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    if arrays is not None:
        arrays.extend(plan)
    return group


def is_image_group(node) -> bool:
    """An HDF5 node holding ISMRMRD images as `pisf replay -o` writes them (<group>/image_<series>)."""
    import h5py

    return isinstance(node, h5py.Group) and any(k.startswith("image_") for k in node)


def latest_image_group(path: Path | str) -> str | None:
    """The image group written last: by the time write_images stores, else (files of other writers)
    by position in the file (HDF5 appends new objects at its end). None without image groups."""
    import h5py

    with _hdf5_lock, h5py.File(path, "r") as h5:
        candidates = []
        for name, node in h5.items():
            if is_image_group(node):
                written = node.attrs.get(WRITTEN_ATTRIBUTE, "")
                written = written.decode() if isinstance(written, bytes) else str(written)
                try:
                    position = h5py.h5o.get_info(node.id).addr
                except AttributeError:  # HDF5 builds that name objects by token, not address
                    position = 0
                candidates.append((written, position, name))
    return max(candidates)[2] if candidates else None


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
