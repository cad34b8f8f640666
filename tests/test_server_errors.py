"""Bad input over real loopback sockets: what the client receives, and that the server lives on.

Every refused stream must end, on the client's side, with a TEXT "ERROR: <what is wrong>", then
CLOSE (id 4), then the end of the connection; slices completed before the problem still come
back as images first. After each case a normal replay must still get its images.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import tracemalloc
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.wire import protocol
from gadgets.wire.client import read_raw, replay
from tools.rawdata.kspace_stream import cartesian_line, header_for

pytestmark = pytest.mark.timeout(60)

NX = NY = 32
COILS = 4


# ---------------------------------------------------------------- synthetic scans

def make_header(nx: int = NX, ny: int = NY, coils: int = COILS, slices: int = 1) -> str:
    return header_for(coils, ny, nx, slices=slices)


def make_line(ky: int, slice_: int = 0, coils: int = COILS, samples: int = NX, last: bool = False,
              counter: int = 0, data: np.ndarray | None = None) -> ismrmrd.Acquisition:
    if data is None:
        rng = np.random.default_rng(1000 * slice_ + ky)
        data = (rng.standard_normal((coils, samples)) + 1j * rng.standard_normal((coils, samples)))
    return cartesian_line(np.asarray(data), ky, slice_, counter, last)


def make_slice(slice_: int = 0, last_flag: bool = True, lines: int = NY, first_counter: int = 0):
    return [make_line(ky, slice_, last=last_flag and ky == lines - 1, counter=first_counter + ky)
            for ky in range(lines)]


def frames(*acquisitions) -> bytes:
    return b"".join(protocol.frame_acquisition(a) for a in acquisitions)


def preamble(config: str = "zerofill", header: str | None = None) -> bytes:
    return protocol.frame_config_name(config) + protocol.frame_header(header or make_header())


# ---------------------------------------------------------------- talking to the server

def connect(server) -> socket.socket:
    sock = socket.create_connection(tuple(server.address), timeout=15)
    sock.settimeout(15)
    return sock


def assert_connection_ends(sock: socket.socket) -> None:
    """After CLOSE the server must end the connection (EOF; a reset also ends it)."""
    try:
        assert sock.recv(1) == b"", "server sent more after CLOSE"
    except ConnectionResetError:
        pass


def read_until_close(sock: socket.socket) -> list:
    reader = protocol.MessageReader(protocol.socket_reader(sock))
    messages = []
    while True:
        message = reader.read()  # PeerClosed here means the server dropped us without CLOSE
        messages.append(message)
        if isinstance(message, protocol.Close):
            break
    assert_connection_ends(sock)
    return messages


def converse(server, payload: bytes, half_close: bool = True) -> list:
    """Send `payload`, optionally shut our write side, return every message up to CLOSE."""
    with connect(server) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_close(sock)


def texts(messages) -> list[str]:
    return [m.text for m in messages if isinstance(m, protocol.Text)]


def images(messages) -> list[ismrmrd.Image]:
    return [m for m in messages if isinstance(m, ismrmrd.Image)]


def assert_error(messages, *fragments: str, images_before: int = 0) -> str:
    """[images_before images], TEXT 'ERROR: ...' naming the problem, CLOSE. Returns the text."""
    assert isinstance(messages[-1], protocol.Close), messages
    error = messages[-2]
    assert isinstance(error, protocol.Text), messages
    assert error.text.startswith("ERROR:"), error.text
    for fragment in fragments:
        assert fragment in error.text, (fragment, error.text)
    assert len(images(messages[:-2])) == images_before, messages
    assert len(messages) == images_before + 2, messages
    return error.text


def assert_still_serving(server) -> None:
    result = replay(None, *server.address, header_text=make_header(), acquisitions=make_slice(),
                    timeout_s=30)
    assert result.error is None and result.closed, result
    assert result.errors == []
    assert len(result.images) == 1


# ---------------------------------------------------------------- framing and limits

def test_truncated_frame_does_not_hang_the_server(server):
    frame = protocol.frame_acquisition(make_line(0))
    with connect(server) as sock:
        sock.sendall(preamble() + frame[:len(frame) // 2])
        sock.shutdown(socket.SHUT_WR)
        # The client is gone mid-frame: nothing to report to; the server just ends the connection.
        reader = protocol.MessageReader(protocol.socket_reader(sock))
        try:
            while True:
                message = reader.read()
                assert not isinstance(message, ismrmrd.Image)
        except protocol.PeerClosed:
            pass
        except ConnectionResetError:
            pass
    assert_still_serving(server)


def test_unknown_message_id(server):
    messages = converse(server, preamble() + struct.pack("<H", 999))
    text = assert_error(messages, "unknown message id 999")
    assert text == "ERROR: unknown message id 999"
    assert_still_serving(server)


@pytest.mark.parametrize("message_id", [protocol.CONFIG_TEXT, protocol.HEADER])
def test_lying_length_is_refused_without_allocating(server, message_id):
    claimed = 3 * 1000 ** 3
    payload = (struct.pack("<HI", message_id, claimed) if message_id == protocol.CONFIG_TEXT
               else protocol.frame_config_name("zerofill") + struct.pack("<HI", message_id, claimed))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        messages = converse(server, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    name = protocol.MESSAGE_NAMES[message_id]
    assert_error(messages, f"{name} declares {claimed} bytes", "limit", str(protocol.Limits().max_text_bytes))
    assert peak < 64 * 1024 * 1024, f"{peak} bytes allocated while refusing a {claimed}-byte claim"
    assert_still_serving(server)


def test_header_that_does_not_parse(server):
    messages = converse(server, preamble(header="<ismrmrdHeader><encoding>not closed"))
    assert_error(messages, "ISMRMRD header does not parse")
    assert_still_serving(server)


# ---------------------------------------------------------------- data contradicting the header

def test_channel_count_contradicts_header(server):
    line = make_line(0, coils=2, counter=7)
    messages = converse(server, preamble() + frames(line))
    assert_error(messages, "acquisition 7 has 2 channels", "say 4")
    assert_still_serving(server)


def test_more_samples_than_encoded_readout(server):
    line = make_line(0, samples=2 * NX, counter=3)
    messages = converse(server, preamble() + frames(line))
    assert_error(messages, "acquisition 3 has 64 samples", "encoded readout matrix is 32")
    assert_still_serving(server)


def test_kspace_encode_step_1_outside_limits(server):
    line = make_line(NY + 8, counter=5)
    messages = converse(server, preamble() + frames(make_line(0), line))
    # The one valid line before it is not lost: flushed with a warning, then the error.
    assert "1 lines received" in messages[0].text and images(messages)[0].meta["PISF_Complete"] == "false"
    assert_error(messages[2:], "acquisition 5", "kspace_encode_step_1 = 40", "encoding limits 0..31")
    assert_still_serving(server)


def test_nan_samples(server):
    data = np.ones((COILS, NX), dtype=np.complex64)
    data[2, 11] = np.nan
    messages = converse(server, preamble() + frames(make_line(0, counter=9, data=data)))
    assert_error(messages, "acquisition 9", "NaN")
    assert_still_serving(server)


def test_image_where_raw_data_was_expected(server):
    image = ismrmrd.Image.from_array(np.zeros((NY, NX), dtype=np.uint16), transpose=False)
    messages = converse(server, preamble() + protocol.frame_image(image))
    assert_error(messages, "image (message id 1022)", "raw data was expected")
    assert_still_serving(server)


# ---------------------------------------------------------------- config names

@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd"])
def test_config_name_that_is_a_path(server, name):
    messages = converse(server, preamble(config=name))
    text = assert_error(messages, repr(name), "not a valid chain name")
    assert "root:" not in text
    assert_still_serving(server)


def test_unknown_config_name_lists_available_chains(server):
    messages = converse(server, preamble(config="no_such_chain"))
    assert_error(messages, "unknown config 'no_such_chain'", "available:", "zerofill")
    assert_still_serving(server)


# ---------------------------------------------------------------- clients that stop early

def test_client_drops_connection_mid_scan(server):
    with connect(server) as sock:
        sock.sendall(preamble() + frames(*make_slice(last_flag=False, lines=NY // 2)))
    # no LAST_IN_SLICE, no CLOSE: the client vanished; the server must carry on.
    assert_still_serving(server)


def test_missing_last_in_slice_is_flushed_with_a_warning(server):
    messages = converse(server, preamble() + frames(*make_slice(last_flag=False, lines=NY - 1))
                        + protocol.frame_close())
    assert isinstance(messages[-1], protocol.Close)
    assert len(images(messages)) == 1
    warnings = texts(messages)
    assert len(warnings) == 1 and not warnings[0].startswith("ERROR"), warnings
    assert "stream ended before its last line" in warnings[0] and "31 lines received" in warnings[0]
    assert images(messages)[0].meta["PISF_Complete"] == "false"
    assert_still_serving(server)


def test_valid_part_is_reconstructed_before_the_error(server):
    header = make_header(slices=2)
    bad = make_line(3, slice_=1, counter=NY + 3, data=np.full((COILS, NX), np.inf, dtype=np.complex64))
    payload = (preamble(header=header) + frames(*make_slice(0)) + frames(*make_slice(1, last_flag=False, lines=3, first_counter=NY))
               + frames(bad))
    messages = converse(server, payload)
    # Slice 0 complete; slice 1's three valid lines flushed with a warning; then the error.
    assert [type(m).__name__ for m in messages] == ["Image", "Text", "Image", "Text", "Close"], messages
    first, warning, partial = messages[:3]
    assert first.slice == 0 and first.meta["PISF_Complete"] == "true"
    assert "slice 1" in warning.text and "3 lines received" in warning.text
    assert not warning.text.startswith("ERROR")
    assert partial.slice == 1 and partial.meta["PISF_Complete"] == "false"
    assert_error(messages[3:], f"acquisition {NY + 3}", "NaN or infinite")
    assert_still_serving(server)


# ---------------------------------------------------------------- other client styles

def test_dependency_query_gets_close_without_error(server):
    messages = converse(server, protocol.frame_config_name("default_measurement_dependencies.xml")
                        + protocol.frame_close(), half_close=False)
    assert len(messages) == 1 and isinstance(messages[0], protocol.Close), messages
    assert_still_serving(server)


def _fire_string(message_id: int, text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<HI", message_id, len(raw)) + raw


def test_fire_style_client_gets_its_images(server, shepp_logan_raw):
    header, acquisitions = read_raw(shepp_logan_raw)
    name = b"zerofill\0".ljust(protocol.CONFIG_FILE_BYTES, b"\0")
    payload = (struct.pack("<H", protocol.CONFIG_FILE) + name + _fire_string(protocol.HEADER, header)
               + _fire_string(protocol.TEXT, json.dumps({"customconfig": "", "sendOriginal": False}))
               + frames(*acquisitions) + protocol.frame_close())
    with connect(server) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        messages = read_until_close(sock)
        sender.join()
    # sendOriginal means nothing to our chains: said once, in a warning, and the scan goes on (the
    # other warning: Debian's generator writes <version>8</version>, which Gadgetron 4.7 refuses)
    warnings = [text for text in texts(messages) if "leave <version> out" not in text]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING:") and len(texts(messages)) == 2
    assert "sendOriginal" in warnings[0]
    received = images(messages)
    assert len(received) == 4
    assert {tuple(i.data.shape) for i in received} == {(1, 1, 128, 128)}
    assert_still_serving(server)


GADGETRON_XML = """<?xml version="1.0" encoding="UTF-8"?>
<configuration>
  <version>2</version>
  <readers><reader><dll>gadgetron_core_readers</dll><classname>AcquisitionReader</classname></reader></readers>
  <writers><writer><dll>gadgetron_core_writers</dll><classname>ImageWriter</classname></writer></writers>
  <stream>
    <external>
      <execute name="gadgets.gadgetron_external.targets" target="zerofill" type="python"/>
      <configuration/>
    </external>
  </stream>
</configuration>
"""


def test_gadgetron_xml_config_selects_the_zerofill_chain(server):
    scan = make_slice()
    by_name = replay(None, *server.address, config="zerofill", header_text=make_header(), acquisitions=scan)
    by_xml = replay(None, *server.address, config_text=GADGETRON_XML, header_text=make_header(),
                    acquisitions=make_slice())
    for result in (by_name, by_xml):
        assert result.error is None and result.closed and result.texts == []
        assert len(result.images) == 1
    a, b = by_name.images[0].image, by_xml.images[0].image
    np.testing.assert_array_equal(a.data, b.data)
    assert a.image_series_index == b.image_series_index == 1
    assert b.meta["ImageComment"] == "zero-filled FFT, RSS coil combination"


def test_xml_config_with_doctype_or_entity_is_refused(server):
    evil = ('<?xml version="1.0"?>\n<!DOCTYPE configuration [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
            + GADGETRON_XML.split("?>", 1)[1].replace("<configuration/>", "<configuration>&xxe;</configuration>"))
    messages = converse(server, protocol.frame_config_text(evil) + protocol.frame_header(make_header()))
    text = assert_error(messages, "DOCTYPE or ENTITY declaration is refused")
    assert "root:" not in text
    assert_still_serving(server)


def test_concurrent_clients_each_get_their_own_images(server, shepp_logan_raw):
    header, _ = read_raw(shepp_logan_raw)
    results: list = [None] * 4

    def one(k: int) -> None:
        _, acquisitions = read_raw(shepp_logan_raw)  # each client its own objects
        results[k] = replay(None, *server.address, header_text=header, acquisitions=acquisitions, timeout_s=50)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(55)
    reference = None
    for result in results:
        assert result is not None and result.error is None and result.closed and result.errors == []
        got = sorted(result.images, key=lambda r: (r.image.repetition, r.image.slice))
        assert len(got) == 4
        assert [r.image.repetition for r in got] == [0, 1, 2, 3]
        if reference is None:
            reference = got
            continue
        for mine, theirs in zip(got, reference):
            np.testing.assert_array_equal(mine.image.data, theirs.image.data)
            assert mine.image.image_index == theirs.image.image_index
            assert mine.image.image_series_index == theirs.image.image_series_index


# ---------------------------------------------------------------- counters against declared encodingLimits

def _header_with_limit(counter: str, maximum: int) -> str:
    """make_header() plus encodingLimits/<counter> 0..maximum."""
    import ismrmrd.xsd as xsd

    header = ismrmrd.xsd.CreateFromDocument(make_header())
    setattr(header.encoding[0].encodingLimits, counter, xsd.limitType(minimum=0, maximum=maximum, center=0))
    return xsd.ToXML(header)


def _slice_with(counter: str, value: int) -> list:
    lines = make_slice()
    for line in lines:
        setattr(line.idx, counter, value)
    return lines


@pytest.mark.parametrize("counter", ["contrast", "phase", "repetition", "set", "average", "segment"])
def test_counter_outside_the_declared_limit_is_refused_by_name(server, counter):
    """A complete slice within the limit gets its image; the first line over it ends the scan with
    one ERROR naming the counter, its value and the limit."""
    header = _header_with_limit(counter, 2)
    over = make_line(3, counter=40)
    setattr(over.idx, counter, 5)
    messages = converse(server, preamble(header=header) + frames(*_slice_with(counter, 2), over))
    assert_error(messages, f"acquisition 40 has {counter} = 5", f"encoding limits 0..2 for {counter}",
                 images_before=1)
    assert_still_serving(server)


def test_counter_without_a_declared_limit_is_not_checked(server):
    """make_header() declares ky and slice limits only: phase 5 is taken as it comes."""
    messages = converse(server, preamble() + frames(*_slice_with("phase", 5)) + protocol.frame_close())
    assert texts(messages) == []
    [image] = images(messages)
    assert image.phase == 5


def test_auxiliary_lines_are_not_counter_checked():
    """The third phase-correction navigator of a Siemens EPI scan carries average 1 under limits 0..0."""
    from gadgets.context import InputError, parse_header
    from gadgets.wire.validate import AcquisitionValidator

    validator = AcquisitionValidator.for_header(parse_header(_header_with_limit("average", 0)))
    navigator = make_line(NY // 2, counter=2)
    navigator.idx.average = 1
    navigator.set_flag(ismrmrd.ACQ_IS_PHASECORR_DATA)
    validator.check(navigator)
    navigator.clear_flag(ismrmrd.ACQ_IS_PHASECORR_DATA)
    with pytest.raises(InputError, match="average = 1"):
        validator.check(navigator)


def _every_line_passes(path) -> dict:
    from gadgets.context import parse_header
    from gadgets.wire.validate import AcquisitionValidator

    header_text, acquisitions = read_raw(path)
    validator = AcquisitionValidator.for_header(parse_header(header_text))
    for acquisition in acquisitions:
        validator.check(acquisition)
    return validator.counter_limits


def test_real_and_simulated_files_pass_the_counter_checks(tmp_path, shepp_logan_raw):
    """Every file we have that is ISMRMRD or converts to it: the Skyra file, the converted Cima.X
    twix, EPI twix and BART Poisson brain (the phantom .mat and the .npy do not convert), Debian's
    generator (4-repetition limits), `pisf simulate` with phases and slices."""
    from tests.conftest import SHARED_DATA
    from tools.rawdata.convert import convert
    from tools.rawdata.simulate import simulate

    simulated = tmp_path / "cine.h5"
    simulate(simulated, matrix=32, coils=2, accel=2, acs=8, slices=2, phases=3, noise=0.01, seed=4)
    assert _every_line_passes(simulated)["phase"] == (0, 2)
    assert _every_line_passes(shepp_logan_raw)["repetition"][1] >= 1
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    assert _every_line_passes(SHARED_DATA / "siemens_skyra_R3_14ch.h5")["average"] == (0, 0)
    for name in ("siemens_cimax_phantom_16ch_twix.dat", "brain_8coil_poisson_ksp.cfl",
                 "twix_skyra_epi_phantom/epi.dat"):
        converted = tmp_path / (Path(name).stem + ".h5")
        convert(SHARED_DATA / name, converted, log=None, warn=lambda text: None)
        assert set(_every_line_passes(converted)) == {"contrast", "phase", "repetition", "set", "average",
                                                      "segment"}, name
