"""Reliability and security of the embedded server (issue 6): the bad input not covered in
test_server_errors.py, faults (stalled, slow and vanished clients, failing gadgets, broken
models), config-name and XML safety, connection limits, TLS, load, leaks and SIGTERM.

Every refused stream ends, on the client's side, with TEXT "ERROR: <what is wrong>", then CLOSE.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets import chain as chain_module
from gadgets.chain import ChainRepository, ConfigError, safe_xml
from gadgets.items import KSpaceSlice
from gadgets.wire import protocol
from gadgets.wire.client import replay
from gadgets.wire.server import ReconServer
from test_server_errors import (COILS, NX, NY, assert_error, assert_still_serving, connect, converse, frames,
                                images, make_header, make_line, make_slice, preamble, read_until_close, texts)

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def _server(**kwargs) -> ReconServer:
    kwargs.setdefault("repository", ChainRepository(REPO / "config"))
    instance = ReconServer("127.0.0.1", 0, **kwargs)
    instance.start_background()
    return instance


@pytest.fixture
def make_server():
    """Extra server instances with their own settings (timeouts, limits, TLS), shut down after."""
    made = []

    def make(**kwargs) -> ReconServer:
        made.append(_server(**kwargs))
        return made[-1]

    yield make
    for instance in made:
        instance.shutdown(wait_s=5)


def _acquisition_header_frame(**fields) -> bytes:
    """An ACQUISITION id + 340-byte header with `fields` set, and no payload behind it."""
    head = make_line(0).getHead()
    for name, value in fields.items():
        setattr(head, name, value)
    return struct.pack("<H", protocol.ACQUISITION) + bytes(head)


def _peak_while(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ============================================================== 1. bad input

@pytest.mark.parametrize("fields, fragments", [
    (dict(active_channels=300), ["acquisition 0 has 300 active channels", "allowed 1..256"]),
    (dict(active_channels=0), ["acquisition 0 has 0 active channels"]),
    (dict(number_of_samples=0), ["acquisition 0 has 0 samples", "allowed 1..65535"]),
    (dict(number_of_samples=4096, trajectory_dimensions=65535),
     ["acquisition 0 declares a 1073856512-byte payload", "limit of 268435456 bytes"]),
])
def test_acquisition_header_that_lies_about_its_payload(server, fields, fragments):
    (messages, peak) = _peak_while(lambda: converse(server, preamble() + _acquisition_header_frame(**fields)))
    assert_error(messages, *fragments)
    assert peak < 16 * 2 ** 20
    assert_still_serving(server)


def test_acquisition_channels_times_samples_over_the_message_limit(make_server):
    """256 channels x 4096 samples = 8 MiB declared, limit 1 MiB: refused after the header, nothing allocated."""
    small = make_server(limits=protocol.Limits(max_message_bytes=2 ** 20))
    frame = _acquisition_header_frame(active_channels=256, number_of_samples=4096, trajectory_dimensions=0)
    messages, peak = _peak_while(lambda: converse(small, preamble() + frame))
    assert_error(messages, "acquisition 0 declares a 8388608-byte payload", "limit of 1048576 bytes")
    assert peak < 2 ** 20
    assert_still_serving(small)


def _image_frame(attribute_length: int | None = None, **fields) -> bytes:
    image = ismrmrd.Image.from_array(np.zeros((4, 4), dtype=np.uint16), transpose=False)
    head = image.getHead()
    for name, value in fields.items():
        if name == "matrix_size":
            head.matrix_size[:] = value
        else:
            setattr(head, name, value)
    attributes = b""
    length = len(attributes) if attribute_length is None else attribute_length
    return struct.pack("<H", protocol.IMAGE) + bytes(head) + struct.pack("<Q", length) + attributes


@pytest.mark.parametrize("frame, fragments", [
    (_image_frame(matrix_size=(65535, 65535, 1)), ["image declares a 8589672450-byte payload", "limit"]),
    (_image_frame(attribute_length=2 ** 63), [f"image attributes declares {2 ** 63} bytes", "limit"]),
    (_image_frame(data_type=77), ["image has unknown data type 77"]),
], ids=["matrix", "attributes", "data_type"])
def test_image_that_lies(server, frame, fragments):
    messages, peak = _peak_while(lambda: converse(server, preamble() + frame))
    assert_error(messages, *fragments)
    assert peak < 16 * 2 ** 20


def test_waveform_that_lies_about_its_size(server):
    head = ismrmrd.Waveform.from_array(np.zeros((2, 10), dtype=np.uint32)).getHead()
    head.channels, head.number_of_samples = 65535, 65535
    frame = struct.pack("<H", protocol.WAVEFORM) + bytes(head)
    messages, peak = _peak_while(lambda: converse(server, preamble() + frame))
    assert_error(messages, "waveform declares a 17179344900-byte payload", "limit")
    assert peak < 16 * 2 ** 20
    assert_still_serving(server)


@pytest.mark.parametrize("frame, fragment", [
    (struct.pack("<HQ", protocol.ERROR, 2 ** 64 - 1), f"ERROR declares {2 ** 64 - 1} bytes"),
    (struct.pack("<HI", protocol.TEXT, 2 ** 32 - 1), f"TEXT declares {2 ** 32 - 1} bytes"),
], ids=["ERROR-uint64", "TEXT-uint32"])
def test_string_frames_whose_length_lies(server, frame, fragment):
    messages, peak = _peak_while(lambda: converse(server, preamble() + frame))
    assert_error(messages, fragment, "more than the limit of 16777216 bytes")
    assert peak < 16 * 2 ** 20


def test_error_from_the_client_ends_the_scan(server):
    messages = converse(server, preamble() + frames(*make_slice()) + protocol.frame_error("coil 3 broke"))
    assert_error(messages, "client reported an error: coil 3 broke", images_before=1)


@pytest.mark.parametrize("cut", [1, 2 + 100, 2 + 340 + 7], ids=["in-id", "in-header", "in-data"])
def test_truncated_frame_is_named(server, cut):
    """The client half-closes inside a frame: it still reads, and is told the frame was cut."""
    frame = protocol.frame_acquisition(make_line(0))
    messages = converse(server, preamble() + frame[:cut])
    assert_error(messages, "truncated frame", "in the middle of a frame")
    assert_still_serving(server)


def test_truncated_length_field(server):
    messages = converse(server, preamble() + struct.pack("<H", protocol.TEXT) + b"\x05\x00")
    assert_error(messages, "truncated frame")


def test_end_of_stream_without_close_mid_scan(server):
    """EOF between frames in the middle of a scan: named; the open slice is dropped, not flushed."""
    messages = converse(server, preamble() + frames(*make_slice(last_flag=False, lines=NY // 2)))
    assert_error(messages, "connection lost", "before CLOSE (message id 4)")


@pytest.mark.parametrize("header, fragment", [
    ('<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><experimentalConditions><H1resonanceFrequency_Hz>'
     '63500000</H1resonanceFrequency_Hz></experimentalConditions></ismrmrdHeader>', "no <encoding> section"),
    ("<notAHeader/>", "ISMRMRD header does not parse"),
    ("\0\0\0", "ISMRMRD header does not parse"),
], ids=["no-encoding", "wrong-root", "nul"])
def test_header_that_parses_as_xml_but_not_as_ismrmrd(server, header, fragment):
    messages = converse(server, preamble(header=header))
    assert_error(messages, fragment)


def test_messages_out_of_order(server):
    messages = converse(server, protocol.frame_header(make_header()))
    assert_error(messages, "expected a config (message id 1 or 2) first, got Header")
    messages = converse(server, protocol.frame_config_name("zerofill") + frames(make_line(0)))
    assert_error(messages, "expected the ISMRMRD header (message id 3) after the config, got Acquisition")


def test_channel_counts_contradicting_each_other(server):
    """No receiverChannels in the header: the first line sets the count, a later line contradicts it."""
    header = make_header().replace(f"<receiverChannels>{COILS}</receiverChannels>", "")
    assert "receiverChannels" not in header.split("<encoding>")[0].replace("acquisitionSystemInformation", "")
    messages = converse(server, preamble(header=header) + frames(make_line(0), make_line(1, coils=2, counter=1)))
    assert_error(messages[-2:], "acquisition 1 has 2 channels", "earlier lines say 4")


def test_lines_shorter_than_the_readout_are_placed_not_refused(server):
    """Sample counts may differ between lines (asymmetric echo: each line sits at its centre
    sample); only more samples than the encoded readout contradict the header (see
    test_server_errors.test_more_samples_than_encoded_readout)."""
    short = [make_line(ky, samples=NX // 2, counter=ky, last=ky == 2) for ky in (1, 2)]
    messages = converse(server, preamble() + frames(make_line(0), *short) + protocol.frame_close())
    assert texts(messages) == [] and len(images(messages)) == 1


def test_centre_sample_outside_the_line(server):
    line = make_line(0, counter=4)
    line.center_sample = NX + 3
    messages = converse(server, preamble() + frames(line))
    assert_error(messages, "acquisition 4 has centre sample 35 but only 32 samples")


def test_slice_outside_the_encoding_limits(server):
    messages = converse(server, preamble() + frames(make_line(0, slice_=3, counter=2)))
    assert_error(messages, "acquisition 2 is for slice 3", "encoding limits end at slice 0")


def test_infinite_samples(server):
    data = np.ones((COILS, NX), dtype=np.complex64)
    data[0, 0] = -np.inf
    messages = converse(server, preamble() + frames(make_line(0, counter=6, data=data)))
    assert_error(messages, "acquisition 6 contains NaN or infinite samples")


def test_waveform_where_raw_data_was_expected_is_ignored(server):
    waveform = ismrmrd.Waveform.from_array(np.arange(40, dtype=np.uint32).reshape(4, 10))
    scan = make_slice()
    payload = (preamble() + frames(*scan[:5]) + protocol.frame_waveform(waveform) + frames(*scan[5:])
               + protocol.frame_close())
    messages = converse(server, payload)
    assert texts(messages) == [] and len(images(messages)) == 1 and isinstance(messages[-1], protocol.Close)


@pytest.mark.parametrize("message_id", [0, 1018, 65535])
def test_other_unknown_ids(server, message_id):
    messages = converse(server, preamble() + struct.pack("<H", message_id) + b"\0" * 16)
    assert_error(messages, f"unknown message id {message_id}")


# ============================================================== 2. faults

def test_stalled_client_gets_the_read_timeout(make_server):
    quick = make_server(io_timeout_s=1.0)
    for payload in (preamble(), preamble() + protocol.frame_acquisition(make_line(0))[:200]):
        with connect(quick) as sock:
            started = time.monotonic()
            sock.sendall(payload)  # ... and then nothing, without closing
            messages = read_until_close(sock)
            elapsed = time.monotonic() - started
        assert [m.text for m in messages[:-1]] == ["ERROR: no data from the client for 1 s"], messages
        assert isinstance(messages[-1], protocol.Close)
        assert 0.9 < elapsed < 5, elapsed
    assert_still_serving(quick)


def test_stall_mid_scan_flushes_what_came_then_times_out(make_server):
    quick = make_server(io_timeout_s=1.0)
    with connect(quick) as sock:
        sock.sendall(preamble() + frames(*make_slice(last_flag=False, lines=NY // 2)))
        messages = read_until_close(sock)
    assert messages[-2].text == "ERROR: no data from the client for 1 s" and isinstance(messages[-1], protocol.Close)
    assert len(images(messages)) == 1 and images(messages)[0].meta["PISF_Complete"] == "false"


def test_client_that_does_not_read_its_images(make_server):
    """Images pile up unread: sends block (bounded buffers), the queue stops the reader, and the
    write timeout ends the connection; nothing hangs and the server serves on."""
    slow = make_server(io_timeout_s=1.0, queue_size=8)
    slices, n = 300, 256
    header = make_header(nx=n, ny=n, coils=1, slices=slices)
    lines = [make_line(n // 2, slice_=s, coils=1, samples=n, last=True, counter=s) for s in range(slices)]
    payload = preamble(header=header) + frames(*lines) + protocol.frame_close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(tuple(slow.address))
    sender = threading.Thread(target=lambda: _quiet(sock.sendall, payload), daemon=True)
    started = time.monotonic()
    sender.start()
    while not slow.sessions and time.monotonic() - started < 10:  # the session thread is registered
        time.sleep(0.01)
    while slow.sessions and time.monotonic() - started < 30:
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert not slow.sessions, "the session of a client that does not read never ended"
    assert elapsed < 15, elapsed
    received = 0
    sock.settimeout(5)
    reader = protocol.MessageReader(protocol.socket_reader(sock))
    try:
        while True:
            received += isinstance(reader.read(), ismrmrd.Image)
    except (protocol.PeerClosed, protocol.ProtocolError, OSError):
        pass  # the server gave up mid-frame: the stream ends without CLOSE
    sock.close()
    assert received < slices, "every image fit into the buffers: the test did not apply back-pressure"
    assert_still_serving(slow)


def _quiet(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass


class FailingStage:
    """Test-only gadget: passes items through and raises on the second slice."""

    def __init__(self, context, fail_at: int = 2):
        self.fail_at = fail_at

    def __call__(self, items):
        seen = 0
        for item in items:
            if isinstance(item, KSpaceSlice):
                seen += 1
                if seen == self.fail_at:
                    raise RuntimeError("injected failure in slice %d" % item.key.slice)
            yield item


FAILING_CHAIN = """name: failing
stages:
  - gadget: slice_accumulator
  - gadget: failing_test_stage
  - gadget: zerofill_recon
  - gadget: image_finish
"""


def test_gadget_that_raises(server, monkeypatch):
    monkeypatch.setitem(chain_module.GADGETS, "failing_test_stage", f"{__name__}:FailingStage")
    payload = (protocol.frame_config_text(FAILING_CHAIN) + protocol.frame_header(make_header(slices=3))
               + frames(*make_slice(0), *make_slice(1, first_counter=NY), *make_slice(2, first_counter=2 * NY))
               + protocol.frame_close())
    messages = converse(server, payload)
    assert_error(messages, "reconstruction failed in chain 'failing'", "RuntimeError: injected failure in slice 1",
                 images_before=1)
    assert_still_serving(server)


def _pisf_chain(model: str) -> str:
    return f"""name: broken_pisf
stages:
  - gadget: slice_accumulator
  - gadget: pisf_recon
    model: {model}
    providers: [CPUExecutionProvider]
  - gadget: image_finish
"""


def _corrupt_model(directory: Path) -> Path:
    path = directory / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def test_missing_or_corrupt_model_file(server, tmp_path):
    pytest.importorskip("onnxruntime")
    for model, fragments in ((str(tmp_path / "nowhere.onnx"), ["FileNotFoundError", "nowhere.onnx", "not found"]),
                             (str(_corrupt_model(tmp_path)), ["corrupt.onnx could not be loaded"])):
        payload = protocol.frame_config_text(_pisf_chain(model)) + protocol.frame_header(make_header()) \
            + frames(*make_slice()) + protocol.frame_close()
        started = time.monotonic()
        messages = converse(server, payload)
        assert time.monotonic() - started < 20
        assert_error(messages, "chain 'broken_pisf', gadget 'pisf_recon' could not be set up", *fragments)
    assert_still_serving(server)


def test_warm_up_reports_broken_models_without_hanging(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(REPO / "config" / "zerofill.yaml", config)
    (config / "missing_model.yaml").write_text(_pisf_chain(str(tmp_path / "nowhere.onnx")))
    (config / "corrupt_model.yaml").write_text(_pisf_chain(str(_corrupt_model(tmp_path))))
    instance = ReconServer("127.0.0.1", 0, ChainRepository(config))
    try:
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="pisf.server"):
            instance.warm_up()
        assert time.monotonic() - started < 20
        logged = [r.getMessage() for r in caplog.records if r.name == "pisf.server"]
        assert any(m.startswith("chain missing_model is not usable") and "not found" in m for m in logged), logged
        assert any(m.startswith("chain corrupt_model is not usable") and "could not be loaded" in m
                   for m in logged), logged
        assert not any("zerofill" in m for m in logged)
    finally:
        instance.listener.close()


# ============================================================== 3. security

def test_config_symlink_out_of_the_config_dir_is_refused(tmp_path, make_server):
    config, outside = tmp_path / "config", tmp_path / "outside"
    config.mkdir()
    outside.mkdir()
    shutil.copy(REPO / "config" / "zerofill.yaml", config)
    (outside / "evil.yaml").write_text((REPO / "config" / "zerofill.yaml").read_text())
    (config / "link.yaml").symlink_to(outside / "evil.yaml")
    (config / "link2.xml").symlink_to(outside / "evil.yaml")
    (config / "inner.yaml").symlink_to(config / "zerofill.yaml")  # inside: fine
    repository = ChainRepository(config)
    for name in ("link", "link.yaml", "link2.xml", "link2"):
        with pytest.raises(ConfigError, match="unknown config"):
            repository.load(name)
    for name in ("../outside/evil", str(outside / "evil.yaml"), "config/../../outside/evil.yaml", "..", "."):
        with pytest.raises(ConfigError, match="not a valid chain name"):
            repository.load(name)
    assert repository.load("inner").stages
    assert "link" not in repository.names() and "zerofill" in repository.names()
    instance = make_server(repository=repository)
    assert_error(converse(instance, preamble(config="link")), "unknown config 'link'")
    assert_still_serving(instance)


BILLION_LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
                  + "".join(f' <!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">\n'
                            for i in range(1, 10))
                  + ']>\n<configuration><stream><external>'
                    '<execute name="gadgets.gadgetron_external.targets" target="zerofill"/>'
                    '<configuration><property name="x" value="&lol9;"/></configuration></external></stream>'
                    '</configuration>')


def test_billion_laughs_config_text_is_refused(server):
    with pytest.raises(ConfigError, match="DOCTYPE or ENTITY"):
        safe_xml(BILLION_LAUGHS, "test")
    messages, peak = _peak_while(lambda: converse(server, protocol.frame_config_text(BILLION_LAUGHS)
                                                  + protocol.frame_header(make_header())))
    assert_error(messages, "DOCTYPE or ENTITY declaration is refused")
    assert peak < 16 * 2 ** 20
    assert_still_serving(server)


def test_billion_laughs_and_external_entity_in_the_header(server):
    """The header is refused before parsing when it declares a DTD, as XML chains are."""
    laughs = BILLION_LAUGHS.split("<configuration>")[0] + "<ismrmrdHeader>&lol9;</ismrmrdHeader>"
    started = time.monotonic()
    messages, peak = _peak_while(lambda: converse(server, preamble(header=laughs)))
    assert time.monotonic() - started < 5 and peak < 16 * 2 ** 20
    assert_error(messages, "ISMRMRD header has a DOCTYPE or ENTITY declaration; refused")
    xxe = make_header().replace("<ismrmrdHeader", '<!DOCTYPE ismrmrdHeader [<!ENTITY xxe SYSTEM '
                                '"file:///etc/passwd">]>\n<ismrmrdHeader', 1)
    xxe = xxe.replace("<H1resonanceFrequency_Hz>63500000", "<H1resonanceFrequency_Hz>&xxe;", 1)
    text = assert_error(converse(server, preamble(header=xxe)), "DOCTYPE or ENTITY declaration; refused")
    assert "root:" not in text


def test_binds_loopback_unless_told():
    import inspect

    from gadgets.wire import server as server_module
    from tools.cli import build_parser

    assert inspect.signature(ReconServer).parameters["host"].default == "127.0.0.1"
    assert build_parser("serve").parse_args(["serve"]).host == "127.0.0.1"
    instance = ReconServer(port=0, repository=ChainRepository(REPO / "config"))
    try:
        assert instance.address[0] == "127.0.0.1"
    finally:
        instance.listener.close()
    assert server_module.add_arguments  # the CLI default above is the one `pisf serve` uses


def test_connection_limit(make_server):
    limited = make_server(max_connections=2)
    held = [connect(limited) for _ in range(2)]
    for sock in held:
        sock.sendall(preamble())  # in a scan: holds a slot
    time.sleep(0.3)
    with connect(limited) as third:
        third.sendall(preamble())  # a client that talks first still gets the message (no reset)
        messages = read_until_close(third)
    assert_error(messages, "server busy: too many concurrent connections")
    held[0].sendall(frames(*make_slice()) + protocol.frame_close())
    first = read_until_close(held[0])
    assert len(images(first)) == 1
    held[0].close()
    deadline = time.monotonic() + 10
    while len(limited.sessions) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_still_serving(limited)  # the freed slot is taken by a new client
    held[1].close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make a test certificate (cryptography is not installed either)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls(tmp_path, make_server):
    from gadgets.wire.server import server_ssl_context

    cert, key = _self_signed(tmp_path)
    secure = make_server(ssl_context=server_ssl_context(cert, key))
    result = replay(None, *secure.address, header_text=make_header(), acquisitions=make_slice(), timeout_s=30,
                    tls=True, tls_ca=cert)
    assert result.error is None and result.closed and result.errors == [] and len(result.images) == 1
    plain = replay(None, *secure.address, header_text=make_header(), acquisitions=make_slice(), timeout_s=10)
    assert not plain.images and not plain.closed  # plain TCP to a TLS server: handshake refused, no data
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _ = _self_signed(other)
    with pytest.raises(ssl.SSLCertVerificationError):  # a server the CA does not vouch for is refused
        replay(None, *secure.address, header_text=make_header(), acquisitions=make_slice(), timeout_s=10,
               tls=True, tls_ca=other_ca)
    assert_still_serving_tls(secure, cert)


def assert_still_serving_tls(instance, cert):
    result = replay(None, *instance.address, header_text=make_header(), acquisitions=make_slice(), timeout_s=30,
                    tls=True, tls_ca=cert)
    assert result.closed and len(result.images) == 1


def test_tls_is_off_by_default():
    from tools.cli import build_parser

    args = build_parser("serve").parse_args(["serve"])
    assert args.tls_cert is None and args.tls_key is None
    replay_args = build_parser("replay").parse_args(["replay", "x.h5"])
    assert not replay_args.tls and replay_args.tls_ca is None


# ============================================================== 4. load

def test_eight_concurrent_scans_match_one_by_one(server, tmp_path):
    from gadgets.wire.client import read_raw
    from tools.rawdata.simulate import simulate

    scans = []
    for k in range(8):
        path = tmp_path / f"sim{k}.h5"
        simulate(path, matrix=48, coils=4, accel=2, acs=12, slices=2, seed=k, oversampling=1,
                 noise=0.02 if k % 2 else 0.0)
        scans.append(read_raw(path))
    alone = [replay(None, *server.address, header_text=h, acquisitions=a, timeout_s=30) for h, a in scans]
    together: list = [None] * len(scans)

    def one(k):
        together[k] = replay(None, *server.address, header_text=scans[k][0], acquisitions=scans[k][1], timeout_s=50)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(scans))]
    held, done = [0], threading.Event()

    def sample():  # how many scans the server held at once
        while not done.is_set():
            held[0] = max(held[0], len(server.sessions))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(55)
    done.set()
    sampler.join()
    print(f"\nconcurrent scans held by the server at once: {held[0]} of {len(scans)}")
    assert held[0] >= 2
    for k, (a, b) in enumerate(zip(alone, together)):
        assert b is not None and a.closed and b.closed and a.errors == b.errors == [], k
        assert len(a.images) == len(b.images) == 2
        for x, y in zip(sorted(a.images, key=lambda r: r.image.slice), sorted(b.images, key=lambda r: r.image.slice)):
            np.testing.assert_array_equal(x.image.data, y.image.data)
    # different datasets really are different images
    assert not np.array_equal(alone[0].images[0].image.data, alone[1].images[0].image.data)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_or_thread_leak_after_many_connections(make_server):
    instance = make_server(io_timeout_s=5.0)
    assert_still_serving(instance)  # warm: lazy imports, first chain build

    def settle():
        deadline = time.monotonic() + 10
        while instance.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)

    settle()
    fds, threads = _fds(), threading.active_count()
    for k in range(50):
        if k % 5 == 0:
            converse(instance, preamble() + struct.pack("<H", 999))  # refused
        elif k % 5 == 1:
            with connect(instance) as sock:  # vanishes mid-scan
                sock.sendall(preamble() + frames(make_line(0)))
        elif k % 5 == 2:
            converse(instance, protocol.frame_close(), half_close=False)
        else:
            assert_still_serving(instance)
    settle()
    print(f"\n50 connections: fds {fds} -> {_fds()}, threads {threads} -> {threading.active_count()}")
    assert _fds() <= fds, (fds, _fds())
    assert threading.active_count() <= threads, (threads, threading.active_count())


def test_sigterm_finishes_the_scan_in_flight(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(REPO / "config" / "zerofill.yaml", config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--port", str(port), "--config-dir",
                                    str(config)], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=15)
                break
            except ConnectionRefusedError:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        with sock:
            sock.settimeout(15)
            slices = 4
            sock.sendall(preamble(header=make_header(slices=slices)) + frames(*make_slice(0)))
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the accept loop notices within 0.5 s and closes the listener
            with pytest.raises(OSError):  # refused (or reset) after SIGTERM
                late = socket.create_connection(("127.0.0.1", port), timeout=5)
                late.settimeout(5)
                late.sendall(preamble())
                if late.recv(1) == b"":
                    raise ConnectionResetError("closed")
            for s in range(1, slices):  # the scan in flight goes on after the signal
                sock.sendall(frames(*make_slice(s, first_counter=s * NY)))
                time.sleep(0.1)
            sock.sendall(protocol.frame_close())
            messages = read_until_close(sock)
        assert texts(messages) == [] and sorted(i.slice for i in images(messages)) == list(range(slices))
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "finishing connections in flight" in log_path.read_text()
