"""Fuzzing the frame reader (short version of `pisf fuzz`): only ProtocolError / PeerClosed may
escape MessageReader, no frame allocates more than a small bound whatever it declares, and the
loopback sample never makes the server fail internally or hang."""
from __future__ import annotations

import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gadgets.wire import protocol
from tools.session import fuzz

pytestmark = pytest.mark.timeout(120)
ALLOWED = (protocol.ProtocolError, protocol.PeerClosed)
BOUND = 4 * 2 ** 20  # far below Limits.max_message_bytes (256 MiB): lies must not be allocated
IDS = sorted(protocol.MESSAGE_NAMES)


@pytest.fixture(scope="module", autouse=True)
def tracing():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _read_bounded(data: bytes, limits: protocol.Limits = protocol.Limits()) -> None:
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    try:
        fuzz.read_all(data, limits)
    except ALLOWED:
        pass
    # anything else propagates and fails the example
    assert time.perf_counter() - started < 2.0
    assert tracemalloc.get_traced_memory()[1] - base < BOUND + 2 * len(data)


VALID = fuzz.valid_frames()

lengths = st.one_of(st.integers(0, 64), st.sampled_from([2 ** 24, 2 ** 24 + 1, 2 ** 28, 2 ** 28 + 1, 2 ** 31,
                                                          2 ** 32 - 1]))


@st.composite
def structured_frame(draw) -> bytes:
    kind = draw(st.sampled_from(["string", "error", "acquisition", "image", "waveform", "valid", "raw"]))
    tail = draw(st.binary(max_size=256))
    if kind == "string":
        message_id = draw(st.sampled_from([protocol.CONFIG_TEXT, protocol.HEADER, protocol.TEXT]))
        return struct.pack("<HI", message_id, draw(lengths)) + tail
    if kind == "error":
        return struct.pack("<HQ", protocol.ERROR, draw(st.one_of(lengths, st.integers(0, 2 ** 64 - 1)))) + tail
    if kind in ("acquisition", "image", "waveform"):
        frame = bytearray(VALID[kind])
        header_bytes = {"acquisition": protocol.ACQUISITION_HEADER_BYTES, "image": protocol.IMAGE_HEADER_BYTES,
                        "waveform": protocol.WAVEFORM_HEADER_BYTES}[kind]
        for _ in range(draw(st.integers(1, 6))):  # overwrite header bytes (sizes, types, indices)
            position = draw(st.integers(2, 2 + header_bytes - 2))
            struct.pack_into("<H", frame, position, draw(st.integers(0, 65535)))
        cut = draw(st.integers(0, len(frame)))
        return bytes(frame[:cut]) + tail
    if kind == "valid":
        frame = VALID[draw(st.sampled_from(sorted(VALID)))]
        return frame[:draw(st.integers(0, len(frame)))] + tail
    return struct.pack("<H", draw(st.one_of(st.sampled_from(IDS), st.integers(0, 65535)))) + tail


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(structured_frame(), min_size=1, max_size=3))
def test_reader_lets_only_protocol_errors_out(parts):
    _read_bounded(b"".join(parts))


@settings(max_examples=150, deadline=None)
@given(channels=st.integers(0, 65535), samples=st.integers(0, 65535), traj=st.integers(0, 65535),
       payload=st.binary(max_size=512), small_limit=st.booleans())
def test_acquisition_sizes_are_checked_before_allocation(channels, samples, traj, payload, small_limit):
    head = fuzz.make_line(0).getHead()
    head.active_channels, head.number_of_samples, head.trajectory_dimensions = channels, samples, traj
    limits = protocol.Limits(max_message_bytes=64 * 1024) if small_limit else protocol.Limits()
    _read_bounded(struct.pack("<H", protocol.ACQUISITION) + bytes(head) + payload, limits)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_fuzz_tool_mutations(seed):
    mutator = fuzz.Mutator(seed)
    for _ in range(5):
        _read_bounded(mutator.stream()[1])


def test_short_fuzz_run_over_the_reader_and_loopback():
    tracemalloc.stop()  # run_fuzz traces by itself
    try:
        report = fuzz.run_fuzz(frames=1500, seed=7, loopback=40)
    finally:
        tracemalloc.start()
    assert report.frames == 1500 and report.crashes == 0, report.crash_examples
    assert report.loopback_frames == 40 and report.loopback_crashes == 0, report.loopback_examples
    assert report.server_alive_after is True
    assert report.peak_allocation_bytes < BOUND and report.max_seconds_per_frame < 2.0
    assert set(report.outcomes) <= {"ProtocolError", "PeerClosed", "end of stream"}


def test_fuzz_is_a_pisf_subcommand():
    from tools.cli import SUBCOMMANDS, build_parser

    assert SUBCOMMANDS["fuzz"][0] == "tools.session.fuzz"
    args = build_parser("fuzz").parse_args(["fuzz", "--frames", "10", "--seed", "3"])
    assert args.frames == 10 and args.seed == 3


def test_mutator_is_deterministic():
    a, b = fuzz.Mutator(11), fuzz.Mutator(11)
    assert [a.stream() for _ in range(50)] == [b.stream() for _ in range(50)]
