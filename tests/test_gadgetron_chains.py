"""The Gadgetron XML chains in config/, their Python side driven exactly as Gadgetron 4.7 drives it.

For `<execute>` nodes the test plays Gadgetron: it binds a port, runs `python -m gadgetron <port>
<module> <target>` (module and target taken from the XML), sends the `<configuration>` element
as CONFIG (id 2), the ISMRMRD header (id 3) as Gadgetron passes it on (refused, as Gadgetron
refuses it, when ISMRMRD 1.14 would not serialise it again), the messages and CLOSE, and reads
what comes back. Between our nodes it plays Gadgetron's RemoveROOversampling /
AcquisitionAccumulateTrigger / BucketToBuffer itself (ReconData serialised by gadgetron-python's
own writer). For `<connect>` nodes it connects to `pisf gadgetron-worker` processes; for the
distributed chain it plays the gateway (prewhitening node, AcquisitionDistributor by slice) and
the worker Gadgetrons (the inner stream as Gadgetron forwards it) over two local workers.
Images are compared with the embedded server's.

The data are a 2-slice `pisf simulate` scan (its header is one Gadgetron 4.7 accepts). The
subprocess side also runs with the Gadgetron image's version set (numpy 1.26.4, ismrmrd 1.14) when
.venv-gadgetron-image exists (tools/make_gadgetron_image_env.sh); skipped otherwise.
"""
from __future__ import annotations

import importlib
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.chain import ChainRepository, run_stages
from gadgets.context import StreamContext, parse_header
from gadgets.gadgetron_external.checks import check_chain, forwarded_to_worker
from gadgets.items import SliceKey
from gadgets.wire import protocol
from gadgets.wire.client import read_raw, replay
from gadgets.wire.validate import gadgetron_header_problems

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"
IMAGE_ENV_PYTHON = REPO / ".venv-gadgetron-image" / "bin" / "python"
pytestmark = pytest.mark.timeout(180)

CHAINS = ["gadgetron_pisf_acquisitions.xml", "gadgetron_pisf_buffers.xml", "gadgetron_pisf_connect.xml",
          "gadgetron_pisf_distributed.xml"]


def pisf_model() -> str:
    """The shipped fast model, or the small benchmark model while it is not there yet."""
    if (REPO / "models" / "pisf_fast.onnx").is_file():
        return "pisf_fast.onnx"
    fallback = REPO / "runs" / "bench_fast.onnx"
    if not fallback.is_file():
        pytest.skip("no PISF model (models/pisf_fast.onnx or runs/bench_fast.onnx)")
    return str(fallback)


@pytest.fixture(scope="module")
def scan_raw(tmp_path_factory) -> Path:
    """A 2-slice simulated scan with a noise readout, R 2 with 24 embedded ACS lines."""
    from tools.rawdata.simulate import simulate

    path = tmp_path_factory.mktemp("gadgetron") / "two_slices.h5"
    simulate(path, matrix=128, coils=8, accel=2, acs=24, slices=2, noise=0.02, seed=21)
    return path


def pythons():
    return [pytest.param(sys.executable, id="current"), pytest.param(str(IMAGE_ENV_PYTHON), id="gadgetron-image-versions",
                       marks=pytest.mark.skipif(not IMAGE_ENV_PYTHON.exists(),
                                                reason="no .venv-gadgetron-image (tools/make_gadgetron_image_env.sh)"))]


def recon_external(root: ElementTree.Element) -> ElementTree.Element:
    """The `<external>` that reconstructs (not the `prewhiten` node ahead of Gadgetron's gadgets)."""
    return next(e for e in root.iter("external")
                if e.find("execute") is None or e.find("execute").get("target") != "prewhiten")


def external_element(path: Path) -> ElementTree.Element:
    return recon_external(ElementTree.parse(path).getroot())


def configuration_text(path: Path, **extra: str) -> str:
    """The `<configuration>` element of the chain's `<external>`, as Gadgetron sends it (id 2),
    with extra properties added (test overrides such as the model path)."""
    configuration = external_element(path).find("configuration")
    configuration = ElementTree.fromstring(ElementTree.tostring(configuration))
    for name, value in extra.items():
        ElementTree.SubElement(configuration, "property", name=name, value=value)
    return ElementTree.tostring(configuration, encoding="unicode")


def framed(message_id: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<HI", message_id, len(raw)) + raw


def exchange(sock: socket.socket, configuration: str, header: str, payload: bytes) -> list:
    """Gadgetron's side of one external connection: config, header, payload, CLOSE; read to CLOSE."""
    # Gadgetron serialises the header again for every external node: ISMRMRD 1.14 refuses some
    assert gadgetron_header_problems(header) == [], "Gadgetron 4.7 would refuse this header"
    sock.settimeout(120)
    stream = framed(protocol.CONFIG_TEXT, configuration) + framed(protocol.HEADER, header) + payload \
        + protocol.frame_close()
    sender = threading.Thread(target=sock.sendall, args=(stream,), daemon=True)
    sender.start()
    reader = protocol.MessageReader(protocol.socket_reader(sock))
    messages = []
    while True:
        message = reader.read()
        messages.append(message)
        if isinstance(message, protocol.Close):
            break
    sender.join(30)
    return messages


def run_execute(python: str, module: str, target: str, configuration: str, header: str, payload: bytes,
                tmp_path: Path, kind=ismrmrd.Image) -> list:
    """What Gadgetron does for `<execute>`: listen, launch `python -m gadgetron`, accept, talk;
    returns what came back of `kind` (images, or acquisitions from the prewhitening node)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port = listener.getsockname()[1]
    env = dict(os.environ, GADGETRON_EXTERNAL_LOG_LEVEL="INFO",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log_path = tmp_path / f"external_{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([python, "-m", "gadgetron", str(port), module, target], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            sock, _ = listener.accept()
            with sock:
                messages = exchange(sock, configuration, header, payload)
            assert process.wait(60) == 0, log_path.read_text(errors="replace")
        finally:
            if process.poll() is None:
                process.kill()  # gadgetron-python spins on a closed socket: never leave it running
                process.wait(10)
            listener.close()
    errors = [m for m in messages if isinstance(m, (protocol.Error, protocol.Text))]
    assert errors == [], (errors, log_path.read_text(errors="replace"))
    return [m for m in messages if isinstance(m, kind)]


def frames(acquisitions) -> bytes:
    return b"".join(protocol.frame_acquisition(a) for a in acquisitions)


def order(image):
    return image.slice, image.contrast, image.phase, image.repetition, image.set


def assert_same_images(mine: list, theirs: list, series_index: int, tolerance: int = 0) -> None:
    assert len(mine) == len(theirs) > 0
    for a, b in zip(sorted(mine, key=order), sorted(theirs, key=order)):
        assert order(a) == order(b)
        assert a.image_series_index == series_index
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        difference = np.abs(a.data.astype(np.int64) - b.data.astype(np.int64))
        assert difference.max() <= tolerance, difference.max()
        for field in ("field_of_view", "position", "read_dir", "phase_dir", "slice_dir"):
            np.testing.assert_allclose(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), atol=1e-5)


def tolerance(python: str, overrides: dict) -> int:
    """Zero-filled images are bit-identical on the same stack; another numpy's FFT, or onnxruntime,
    may round a pixel to the next 12-bit level."""
    return 0 if python == sys.executable and "pisf_recon.model" not in overrides else 1


def embedded(server, raw: Path, xml: Path, **extra: str) -> list:
    """Our embedded server running the same XML chain (id 2), with the same overrides."""
    text = ElementTree.tostring(ElementTree.parse(xml).getroot(), encoding="unicode")
    if extra:
        root = ElementTree.fromstring(text)
        configuration = recon_external(root).find("configuration")
        for name, value in extra.items():
            ElementTree.SubElement(configuration, "property", name=name, value=value)
        text = ElementTree.tostring(root, encoding="unicode")
    result = replay(raw, *server.address, config_text=text, timeout_s=120)
    assert result.error is None and result.closed and result.errors == [], (result.error, result.texts)
    return [r.image for r in result.images]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CHAINS)
def test_every_shipped_chain_passes_what_gadgetron_checks_with_the_scan_header(name, scan_raw):
    header, _ = read_raw(scan_raw)
    assert [str(f) for f in check_chain(CONFIG / name, header=header)] == []


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("python", pythons())
def test_acquisitions_chain_zerofill_and_pisf(server, scan_raw, tmp_path, python):
    """(a) raw acquisitions into our chain: zerofill (via `chain`) and PISF, both as the embedded server."""
    xml = CONFIG / "gadgetron_pisf_acquisitions.xml"
    execute = external_element(xml).find("execute")
    header, acquisitions = read_raw(scan_raw)
    payload = frames(acquisitions)
    model = pisf_model()
    for overrides in ({"chain": "zerofill"}, {"pisf_recon.model": model, "pisf_recon.threads": "1"}):
        started = time.perf_counter()
        images = run_execute(python, execute.get("name"), execute.get("target"), configuration_text(xml, **overrides),
                             header, payload, tmp_path)
        elapsed = time.perf_counter() - started
        reference = embedded(server, scan_raw, xml, **overrides)
        assert_same_images(images, reference, series_index=2, tolerance=tolerance(python, overrides))
        print(f"{overrides}: {len(images)} images in {elapsed:.2f} s")


# ---------------------------------------------------------------------------------------------
def bucket_to_buffer(header_text: str, acquisitions: list) -> "object":
    """What Gadgetron's NoiseAdjust, RemoveROOversampling, AcquisitionAccumulateTrigger and
    BucketToBuffer hand to the external gadget: one ReconData; every SliceKey one N entry of a
    [RO, E1, E2, CHA, N, S=1, LOC=1] buffer with its headers; ACS lines in the ref buffer."""
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription

    header = parse_header(header_text)
    context = StreamContext(header=header)
    upstream = ChainRepository(CONFIG).load("zerofill")
    upstream.stages = upstream.stages[:2]  # noise_prewhitening, remove_oversampling
    lines = [item for item in run_stages(upstream.build(context), acquisitions)
             if isinstance(item, ismrmrd.Acquisition) and not item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    keys = sorted({SliceKey.of(line.idx) for line in lines})
    enc = context.encoding
    e1_size, e2_size = enc.encoded_matrix[1], enc.encoded_matrix[2]
    readout, coils = context.readout_samples, lines[0].active_channels

    def empty():
        return (np.zeros((readout, e1_size, e2_size, coils, len(keys), 1, 1), np.complex64),
                np.array([ismrmrd.AcquisitionHeader() for _ in range(e1_size * e2_size * len(keys))],
                         dtype=object).reshape(e1_size, e2_size, len(keys), 1, 1))

    data, headers = empty()
    ref_data, ref_headers = empty()
    for line in lines:
        n = keys.index(SliceKey.of(line.idx))
        e1, e2 = line.idx.kspace_encode_step_1, line.idx.kspace_encode_step_2
        calibration = (line.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                       or line.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))
        targets = [(ref_data, ref_headers)] if calibration else []
        if not line.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION):
            targets.append((data, headers))
        for buffer, buffer_headers in targets:
            x0 = readout // 2 - line.center_sample
            buffer[x0:x0 + line.number_of_samples, e1, e2, :, n, 0, 0] = line.data.T
            buffer_headers[e1, e2, n, 0, 0] = line.getHead()
    sampling = SamplingDescription()
    sampling.encoded_FOV[:] = enc.encoded_fov_mm
    sampling.recon_FOV[:] = enc.recon_fov_mm
    sampling.encoded_matrix[:] = (readout, e1_size, e2_size)
    sampling.recon_matrix[:] = enc.recon_matrix
    sampling.sampling_limits[0].min, sampling.sampling_limits[0].center = 0, readout // 2
    sampling.sampling_limits[0].max = readout - 1
    sampling.sampling_limits[1].min, sampling.sampling_limits[1].max, sampling.sampling_limits[1].center = enc.ky_limits
    has_ref = any(h.number_of_samples for h in ref_headers.flat)
    return ReconData([ReconBit(ReconBuffer(data, None, None, headers, sampling),
                               ReconBuffer(ref_data, None, None, ref_headers, sampling) if has_ref else None)])


def serialise(item) -> bytes:
    """Bytes of one message, written by gadgetron-python's own writer (as Gadgetron's C++ writer would)."""
    from gadgetron.types.recon_data import write_recon_data

    class Sink:
        def __init__(self):
            self.buffer = io.BytesIO()

        def write(self, data):
            self.buffer.write(data)

    sink = Sink()
    write_recon_data(sink, item)
    return sink.buffer.getvalue()


@pytest.mark.parametrize("python", pythons())
def test_buffers_chain_matches_the_embedded_server(server, scan_raw, tmp_path, python):
    """(b) no storage server: our `prewhiten` node first (noise readout consumed, lines whitened),
    Gadgetron's RemoveROOversampling / AccTrig / BucketToBuffer, then ReconData into `pisf_buffers`
    (and the zerofill chain the same way)."""
    xml = CONFIG / "gadgetron_pisf_buffers.xml"
    prewhiten, recon = (e.find("execute") for e in ElementTree.parse(xml).getroot().iter("external"))
    assert prewhiten.get("target") == "prewhiten" and recon.get("target") == "pisf_buffers"
    assert "NoiseAdjustGadget" not in [c.text for c in ElementTree.parse(xml).getroot().iter("classname")]
    header, acquisitions = read_raw(scan_raw)
    whitened = run_execute(python, prewhiten.get("name"), prewhiten.get("target"), "<configuration/>", header,
                           frames(acquisitions), tmp_path, kind=ismrmrd.Acquisition)
    noise = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert noise and len(whitened) == len(acquisitions) - len(noise)
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in whitened)
    # the harness's own prewhitening stage finds no noise readout now and passes the lines on
    recon_data = bucket_to_buffer(header, whitened)
    assert recon_data.bits[0].data.data.shape[4] == 2 and recon_data.bits[0].ref is not None
    payload = serialise(recon_data)
    model = pisf_model()
    for overrides in ({"chain": "zerofill"}, {"pisf_recon.model": model, "pisf_recon.threads": "1"}):
        images = run_execute(python, recon.get("name"), recon.get("target"), configuration_text(xml, **overrides),
                             header, payload, tmp_path)
        # the embedded server buffers itself; `pisf_buffers` there runs the pisf chain on acquisitions
        reference = embedded(server, scan_raw, xml, **overrides)
        assert_same_images(images, reference, series_index=2, tolerance=tolerance(python, overrides))


def test_recon_data_adapter_places_lines_like_the_accumulator(shepp_logan_raw):
    from gadgets.accumulate import SliceAccumulator
    from gadgets.gadgetron_external.recondata import ReconDataAdapter
    from gadgets.items import KSpaceSlice

    header, acquisitions = read_raw(shepp_logan_raw)
    recon_data = bucket_to_buffer(header, acquisitions)
    context = StreamContext(header=parse_header(header))
    adapted = [item for item in ReconDataAdapter(context)([recon_data]) if isinstance(item, KSpaceSlice)]
    upstream = ChainRepository(CONFIG).load("zerofill")
    upstream.stages = upstream.stages[:3]
    context2 = StreamContext(header=parse_header(header))
    _, fresh = read_raw(shepp_logan_raw)  # the stages whiten lines in place: start from the file again
    streamed = [item for item in run_stages(upstream.build(context2), fresh) if isinstance(item, KSpaceSlice)]
    assert [s.key for s in adapted] == sorted(s.key for s in streamed)
    for a, b in zip(adapted, sorted(streamed, key=lambda s: s.key)):
        np.testing.assert_array_equal(a.kspace, b.kspace)
        np.testing.assert_array_equal(a.sampled, b.sampled)
        np.testing.assert_array_equal(a.calibration_sampled, b.calibration_sampled)
        np.testing.assert_array_equal(a.calibration, b.calibration)


# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Worker:
    """A `pisf gadgetron-worker` process on a loopback port, ready once it says it is listening."""

    def __init__(self, python: str, port: int, log_path: Path, *arguments: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.port, self.log_path = port, log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([python, "-c", "import sys; from tools.cli import main; sys.exit(main())",
                                         "gadgetron-worker", "--port", str(port), "--host", "127.0.0.1", *arguments],
                                        cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Worker":
        deadline = time.monotonic() + 60
        while b"listening" not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(self.output())
            time.sleep(0.1)
        return self

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *_) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@pytest.mark.parametrize("python", pythons())
def test_connect_chain_with_a_persistent_worker(server, scan_raw, tmp_path, python):
    """(c) `<connect>`: the worker loads the model once and serves several scans."""
    xml = CONFIG / "gadgetron_pisf_connect.xml"
    connect = external_element(xml).find("connect")
    model = pisf_model()
    port = free_port()
    log_path = tmp_path / "worker.log"
    overrides = {"pisf_recon.model": model, "pisf_recon.threads": "1"}
    header, acquisitions = read_raw(scan_raw)
    payload = frames(acquisitions)
    recon_data_payload = serialise(bucket_to_buffer(header, acquisitions))
    # the worker loads and warms the model of its default properties once, before listening
    with Worker(python, port, log_path, "--chain", "pisf", "--property", f"pisf_recon.model={model}",
                "--property", "pisf_recon.threads=1", "--max-connections", "3") as worker:
        results, timings = [], []
        # the chain's own <configuration> (the model comes from the worker's defaults), then with
        # the override in the configuration, then ReconData (input type detected per connection)
        for configuration, data in ((configuration_text(xml), payload),
                                    (configuration_text(xml, **overrides), payload),
                                    (configuration_text(xml), recon_data_payload)):
            started = time.perf_counter()
            with socket.create_connection((connect.get("address"), port)) as sock:
                messages = exchange(sock, configuration, header, data)
            timings.append(time.perf_counter() - started)
            errors = [m for m in messages if isinstance(m, (protocol.Error, protocol.Text))]
            assert errors == [], (errors, worker.output())
            results.append([m for m in messages if isinstance(m, ismrmrd.Image)])
        assert worker.process.wait(60) == 0, worker.output()
    # our server runs <execute> chains only: the acquisitions chain has the same configuration
    reference = embedded(server, scan_raw, CONFIG / "gadgetron_pisf_acquisitions.xml", chain="pisf", **overrides)
    for images in results:  # acquisitions twice, then ReconData (input type detected per connection)
        assert_same_images(images, reference, series_index=2, tolerance=1)
    print("worker connections (s):", ", ".join(f"{t:.2f}" for t in timings))


# ---------------------------------------------------------------------------------------------
def distribute_by_slice(acquisitions, workers: int) -> dict[int, tuple[int, list]]:
    """AcquisitionDistributor, parallel_dimension slice: a channel per slice value, the channels
    handed to the workers in turn -> {slice: (worker index, acquisitions)}."""
    channels: dict[int, tuple[int, list]] = {}
    for acquisition in acquisitions:
        key = acquisition.idx.slice
        if key not in channels:
            channels[key] = (len(channels) % workers, [])
        channels[key][1].append(acquisition)
    return channels


def run_worker_gadgetrons(worker_chain: str, channels: dict, ports: list[int], header: str) -> list:
    """Each channel as a worker Gadgetron runs it: its chain is the forwarded inner stream, whose
    `<connect port>` reaches the pisf gadgetron-worker on the worker host's own localhost (here:
    worker i's port); the forwarded external has no <configuration> left, so none is sent."""
    worker = ElementTree.fromstring(worker_chain)
    (connect,) = [e for e in worker.iter("connect")]
    assert connect.get("address") is None and worker.find("stream/external/configuration") is None
    images = []
    for index, lines in channels.values():
        with socket.create_connection(("127.0.0.1", ports[index])) as sock:
            messages = exchange(sock, "", header, frames(lines))
        assert [m for m in messages if isinstance(m, (protocol.Error, protocol.Text))] == []
        images += [m for m in messages if isinstance(m, ismrmrd.Image)]
    return images


@pytest.mark.parametrize("python", pythons())
def test_distributed_chain_gateway_and_two_workers(server, scan_raw, tmp_path, python):
    """(d) the gateway prewhitens and distributes by slice to two workers; both slices come back
    prewhitened, as the serial chain makes them. Without the gateway's prewhitening (the chain as
    it was) slice 1 is not whitened: only slice 0's worker sees the noise readout."""
    xml = CONFIG / "gadgetron_pisf_distributed.xml"
    root = ElementTree.parse(xml).getroot()
    stream = root.find("stream")
    prewhiten, distributed = list(stream)
    execute = prewhiten.find("execute")
    assert execute.get("target") == "prewhiten" and distributed.tag == "distributed"
    worker_chain = forwarded_to_worker(distributed)
    assert check_chain(ElementTree.fromstring(worker_chain), origin="worker") == []  # a worker accepts it
    header, acquisitions = read_raw(scan_raw)
    # image_finish fixes its scale on the first image it sees, and each worker sees one slice only:
    # workers and the serial run get the same fixed factor (docs/GADGETRON.md: fix image_finish.scale on workers)
    scale = embedded(server, scan_raw, CONFIG / "gadgetron_pisf_acquisitions.xml",
                     chain="zerofill")[0].meta["PISF_ScaleFactor"]
    serial = embedded(server, scan_raw, CONFIG / "gadgetron_pisf_acquisitions.xml", chain="zerofill",
                      **{"image_finish.scale": scale})
    ports = [free_port(), free_port()]
    arguments = ("--chain", "zerofill", "--property", "image_finish.series_index=2",
                 "--property", f"image_finish.scale={scale}", "--max-connections", "2")
    with Worker(python, ports[0], tmp_path / "worker0.log", *arguments) as first, \
            Worker(python, ports[1], tmp_path / "worker1.log", *arguments) as second:
        whitened = run_execute(python, execute.get("name"), execute.get("target"), "<configuration/>", header,
                               frames(acquisitions), tmp_path, kind=ismrmrd.Acquisition)
        channels = distribute_by_slice(whitened, workers=2)
        assert sorted((key, index) for key, (index, _) in channels.items()) == [(0, 0), (1, 1)]
        images = run_worker_gadgetrons(worker_chain, channels, ports, header)
        _, raw = read_raw(scan_raw)  # the old chain: the raw lines, noise readout included, distributed
        unwhitened = run_worker_gadgetrons(worker_chain, distribute_by_slice(raw, workers=2), ports, header)
        for worker in (first, second):
            assert worker.process.wait(60) == 0, worker.output()
    assert_same_images(images, serial, series_index=2, tolerance=0 if python == sys.executable else 1)
    by_slice = {image.slice: image.data.astype(np.int64) for image in unwhitened}
    reference = {image.slice: image.data.astype(np.int64) for image in serial}
    assert np.abs(by_slice[0] - reference[0]).max() <= 1   # the noise readout went with slice 0
    assert np.abs(by_slice[1] - reference[1]).max() > 50    # slice 1's worker never saw it
