"""Bounded memory (issue 19.1): declared sizes checked against the header before the payload is
read, and received lines waiting for a chain bounded in bytes, per connection and server-wide.

The size refusals are sent with the frame's fixed header only and no payload: the server can
answer only if it checked the declared sizes before reading (and allocating) the data.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
import yaml

from gadgets.chain import GADGETS, ChainRepository
from gadgets.context import InputError
from gadgets.wire import memory, protocol
from gadgets.wire.budget import ByteBudget, item_bytes
from gadgets.wire.server import ReconServer
from gadgets.wire.validate import AcquisitionValidator
from test_server_errors import (COILS, NX, NY, assert_error, assert_still_serving, converse, frames, images,
                                make_header, make_line, make_slice, preamble, read_until_close, texts)

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[1]


def head_bytes(**fields) -> bytes:
    head = make_line(0).getHead()
    for name, value in fields.items():
        setattr(head, name, value)
    return struct.pack("<H", protocol.ACQUISITION) + bytes(head)


def converse_open(server, payload: bytes) -> list:
    """Send `payload` and read to CLOSE without half-closing: the server must answer while the
    rest of a frame it was promised never comes."""
    with socket.create_connection(tuple(server.address), timeout=15) as sock:
        sock.settimeout(15)
        sock.sendall(payload)
        return read_until_close(sock)


# ---------------------------------------------------------------- declared sizes, refused unread

def test_trajectory_attack_is_refused_at_the_header_and_the_server_serves_on(server):
    """Navigator lines on a Cartesian header each declaring a 512 x 65535 trajectory (128 MiB):
    issue 19 measured 210 MiB -> 2.2 GiB kept. Refused from the first line's header."""
    header = make_header(nx=512, ny=NY)
    attack = head_bytes(number_of_samples=512, trajectory_dimensions=65535, center_sample=256,
                        flags=1 << (ismrmrd.ACQ_IS_NAVIGATION_DATA - 1))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        messages = converse_open(server, preamble(header=header) + attack + bytes(4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = assert_error(messages, "acquisition 0", "512 x 65535", "128.0 MiB", "Cartesian",
                        "trajectory_dimensions must be 0", "refused before reading")
    assert "\n" not in text
    assert peak < 16 * 1024 * 1024, f"{peak} bytes allocated while refusing a 128 MiB trajectory"
    assert_still_serving(server)


def test_valid_slices_before_an_oversized_line_still_get_their_images(server):
    oversized = head_bytes(number_of_samples=NX, trajectory_dimensions=2, center_sample=NX // 2, scan_counter=99)
    messages = converse_open(server, preamble() + frames(*make_slice()) + oversized)
    assert_error(messages, "acquisition 99", "Cartesian", images_before=1)
    assert_still_serving(server)


def test_more_channels_than_the_header_is_refused_before_the_payload(server):
    messages = converse_open(server, preamble() + head_bytes(active_channels=COILS * 8, scan_counter=5))
    assert_error(messages, "acquisition 5 has 32 channels", f"say {COILS}")
    assert_still_serving(server)


def test_more_samples_than_the_readout_is_refused_before_the_payload(server):
    messages = converse_open(server, preamble() + head_bytes(number_of_samples=60000, scan_counter=6))
    assert_error(messages, "acquisition 6 has 60000 samples", f"encoded readout matrix is {NX}")
    assert_still_serving(server)


def test_an_oversized_noise_line_is_refused_and_a_longer_one_within_the_margin_is_not(server):
    noise = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
    messages = converse_open(server, preamble() + head_bytes(number_of_samples=4096, flags=noise, scan_counter=7))
    assert_error(messages, "noise acquisition 7 has 4096 samples", "more than 128")
    # a noise line twice the readout (within the margin) passes, and the scan after it is imaged
    rng = np.random.default_rng(3)
    line = make_line(0, samples=2 * NX, data=(rng.standard_normal((COILS, 2 * NX)) + 0j))
    line.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    messages = converse(server, preamble() + frames(line, *make_slice()) + protocol.frame_close())
    assert len(images(messages)) == 1, texts(messages)
    assert not [t for t in texts(messages) if t.startswith("ERROR")]


def test_an_oversized_waveform_is_refused_before_its_payload(server):
    head = ismrmrd.WaveformHeader()
    head.channels, head.number_of_samples, head.waveform_id = 256, 65535, 1
    messages = converse_open(server, preamble() + struct.pack("<H", protocol.WAVEFORM) + bytes(head))
    assert_error(messages, "waveform (id 1) declares 256 channels x 65535 samples", "physiology")
    assert_still_serving(server)


def _radial_header(samples: int = 64) -> object:
    parsed = ismrmrd.xsd.CreateFromDocument(make_header(nx=samples))
    parsed.encoding[0].trajectory = xsd.trajectoryType.RADIAL
    return parsed


def test_a_non_cartesian_header_allows_a_trajectory_of_a_few_dimensions_only():
    validator = AcquisitionValidator.for_header(_radial_header())
    head = make_line(0, samples=64).getHead()
    head.trajectory_dimensions = 2
    validator.check_header(head)                  # kx, ky: what a radial line carries
    head.trajectory_dimensions = 65535
    with pytest.raises(InputError, match="65535 trajectory dimensions .* radial trajectory has at most 4"):
        validator.check_header(head)


# ---------------------------------------------------------------- the byte budget

def test_a_connection_waits_over_its_budget_and_an_empty_one_always_takes_a_line():
    budget = ByteBudget(server_bytes=10_000, connection_bytes=1_000)
    first, second = budget.connection(), budget.connection()
    assert first.acquire(5_000)                   # empty queue: a line larger than the budget still passes
    assert not first.acquire(1, give_up=lambda: True)   # over its own budget: waits (here: gives up)
    assert first.waits == 1 and first.queued == 5_000
    assert second.acquire(900) and second.acquire(100)
    assert not second.acquire(1, give_up=lambda: True)
    first.release(5_000)
    assert second.acquire(0) and budget.queued == 1_000
    second.close()
    assert budget.queued == 0 and budget.peak == 6_000


def test_the_server_budget_holds_over_connections():
    budget = ByteBudget(server_bytes=1_500, connection_bytes=1_000)
    first, second = budget.connection(), budget.connection()
    assert first.acquire(800) and first.acquire(200)
    assert second.acquire(400)                    # empty: always one line
    assert not second.acquire(400, give_up=lambda: True)   # 1 400 + 400 > 1 500
    released = threading.Timer(0.2, first.release, args=(600,))
    released.start()
    assert second.acquire(400)                    # waits until the first connection's chain takes lines
    released.join()
    assert budget.queued == 1_200


def test_item_bytes_counts_samples_trajectory_and_header():
    line = make_line(0)
    assert item_bytes(line) == COILS * NX * 8 + protocol.ACQUISITION_HEADER_BYTES
    line.resize(NX, COILS, trajectory_dimensions=2)
    assert item_bytes(line) == COILS * NX * 8 + NX * 2 * 4 + protocol.ACQUISITION_HEADER_BYTES


class Gate:
    """A stage that takes nothing from its input until GATE opens, then passes everything on and
    counts it: the chain stands still while the reader fills the queue."""
    opened = threading.Event()
    passed = 0

    def __init__(self, context):
        self.context = context

    def __call__(self, items):
        Gate.opened.wait(60)
        for item in items:
            Gate.passed += 1
            yield item


def _gated_zerofill() -> str:
    chain = yaml.safe_load((REPO / "config" / "zerofill.yaml").read_text())
    chain["stages"].insert(0, {"gadget": "test_gate"})
    chain["name"] = "gated-zerofill"
    return yaml.safe_dump(chain)


def test_a_queue_over_its_budget_pushes_back_and_loses_nothing(monkeypatch):
    """A chain that stands still: the reader stops at the byte budget (no queue growth, the client
    is held by TCP), and once the chain moves every line is reconstructed."""
    monkeypatch.setitem(GADGETS, "test_gate", f"{__name__}:Gate")
    Gate.opened.clear()
    Gate.passed = 0
    line_bytes = item_bytes(make_line(0))
    budget = 8 * line_bytes                       # 8 of the slice's 32 lines
    server = ReconServer("127.0.0.1", 0, ChainRepository(REPO / "config"), io_timeout_s=30.0,
                         connection_budget_bytes=budget, server_budget_bytes=64 * line_bytes)
    server.start_background()
    try:
        payload = (protocol.frame_config_text(_gated_zerofill()) + protocol.frame_header(make_header())
                   + frames(*make_slice()) + protocol.frame_close())
        with socket.create_connection(tuple(server.address), timeout=30) as sock:
            sock.settimeout(30)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 30
            while server.budget.waits == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.budget.waits >= 1, "the reader never had to wait: the queue is not bounded in bytes"
            assert server.budget.queued <= budget, (server.budget.queued, budget)
            assert Gate.passed == 0
            Gate.opened.set()
            messages = read_until_close(sock)
        assert len(images(messages)) == 1, texts(messages)
        assert not [t for t in texts(messages) if t.startswith("ERROR")]
        assert Gate.passed == NY                  # every line reached the chain
        assert server.budget.peak <= budget, (server.budget.peak, budget)
        assert server.budget.queued == 0          # given back at the end
    finally:
        Gate.opened.set()
        server.shutdown(wait_s=5)


def test_memory_is_handed_back_by_the_last_connection_and_rarely_while_others_run(monkeypatch):
    runs = []
    monkeypatch.setattr(memory, "hand_back", lambda: runs.append(time.monotonic()))
    monkeypatch.setattr(memory, "_last_hand_back", [0.0])
    assert memory.connection_ended(others_active=3)          # none for long: runs
    assert not memory.connection_ended(others_active=2)      # others run, just ran: they are spared the pause
    assert memory.connection_ended(others_active=0)          # the last one out always hands back
    assert len(runs) == 2
