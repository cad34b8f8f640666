"""Our external-gadget targets driven by gadgetron-python's own Connection, launched as Gadgetron does.

The test plays Gadgetron: it binds a loopback port, runs `python -m gadgetron <port>
gadgets.gadgetron_external.targets zerofill`, accepts the connection, sends CONFIG (id 2, the
<configuration> element), HEADER (id 3, one Gadgetron 4.7 passes on), the acquisitions (id 1008)
and CLOSE, and reads back what the Python side sends (images 1022, ERROR 8, CLOSE 4).

Failure (issue 21): our side sends ERROR and CLOSE and its process ends at once, also when
Gadgetron goes away mid-scan (gadgetron-python alone spins on the closed socket for ever); the
persistent worker answers a failing connection the same way and carries on.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.wire import protocol
from gadgets.wire.client import read_raw, replay
from gadgets.wire.validate import gadgetron_header_problems

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(90)

CONFIGURATION = '<configuration><property name="image_finish.series_index" value="7"/></configuration>'


class FakeGadgetron:
    """Gadgetron's side of one external Python gadget: listen, launch, accept."""

    def __init__(self, target: str = "zerofill", tmp_path: Path | None = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(60)
        port = self.listener.getsockname()[1]
        env = dict(os.environ, GADGETRON_EXTERNAL_LOG_LEVEL="INFO",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.log_path = (tmp_path or Path(".")) / f"external_{port}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port),
                                         "gadgets.gadgetron_external.targets", target],
                                        cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.sock: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(60)
        return self.sock

    def send_config_and_header(self, configuration: str, header: str) -> None:
        # Gadgetron 4.7 serialises the header again before it sends it: ISMRMRD 1.14 refuses some
        assert gadgetron_header_problems(header) == [], "Gadgetron 4.7 would refuse this header"
        for message_id, text in ((protocol.CONFIG_TEXT, configuration), (protocol.HEADER, header)):
            raw = text.encode("utf-8")
            self.sock.sendall(struct.pack("<HI", message_id, len(raw)) + raw)

    def read_until_close(self) -> list:
        reader = protocol.MessageReader(protocol.socket_reader(self.sock))
        messages = []
        while True:
            message = reader.read()
            messages.append(message)
            if isinstance(message, protocol.Close):
                return messages

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # gadgetron-python spins on a closed socket: never leave it running
            self.process.wait(10)
        for thing in (self.sock, self.listener, self.log):
            if thing is not None:
                thing.close()


@pytest.fixture(scope="module")
def scan_raw(tmp_path_factory) -> Path:
    """A 2-slice simulated scan (128 x 128, 8 coils, R 2) whose header Gadgetron 4.7 accepts."""
    from tools.rawdata.simulate import simulate

    path = tmp_path_factory.mktemp("external") / "two_slices.h5"
    simulate(path, matrix=128, coils=8, accel=2, acs=24, slices=2, noise=0.02, seed=3)
    return path


@pytest.fixture
def gadgetron(tmp_path):
    fakes = []

    def launch(target: str = "zerofill") -> FakeGadgetron:
        fake = FakeGadgetron(target, tmp_path)
        fakes.append(fake)
        return fake

    yield launch
    for fake in fakes:
        fake.close()


def test_zerofill_target_matches_the_embedded_server(server, scan_raw, gadgetron):
    header, acquisitions = read_raw(scan_raw)
    fake = gadgetron("zerofill")
    sock = fake.accept()
    fake.send_config_and_header(CONFIGURATION, header)
    stream = b"".join(protocol.frame_acquisition(a) for a in acquisitions) + protocol.frame_close()
    sender = threading.Thread(target=sock.sendall, args=(stream,), daemon=True)
    sender.start()
    messages = fake.read_until_close()
    sender.join(30)
    assert fake.wait() == 0, fake.output()

    errors = [m for m in messages if isinstance(m, (protocol.Error, protocol.Text))]
    assert errors == [], errors
    external = [m for m in messages if isinstance(m, ismrmrd.Image)]
    assert len(messages) == len(external) + 1  # images, then CLOSE

    embedded = replay(scan_raw, *server.address, config="zerofill", timeout_s=60)
    assert embedded.error is None and embedded.closed and embedded.texts == []
    embedded_images = [r.image for r in embedded.images]
    assert len(external) == len(embedded_images) == 2

    def order(image):
        return image.slice, image.contrast, image.phase, image.repetition, image.set

    for mine, theirs in zip(sorted(external, key=order), sorted(embedded_images, key=order)):
        assert mine.image_series_index == 7  # from <configuration>
        assert theirs.image_series_index == 1
        assert order(mine) == order(theirs)
        assert mine.image_index == theirs.image_index
        assert mine.data.dtype == theirs.data.dtype == np.uint16
        np.testing.assert_array_equal(mine.data, theirs.data)
        for field in ("matrix_size", "field_of_view", "position", "read_dir", "phase_dir", "slice_dir"):
            np.testing.assert_array_equal(np.asarray(getattr(mine, field)), np.asarray(getattr(theirs, field)))


def test_header_that_breaks_the_chain_sends_error_and_the_process_ends(scan_raw, gadgetron):
    header, _ = read_raw(scan_raw)
    broken = header.replace("<x>256</x>", "<x>0</x>", 1)  # encoded readout of zero samples
    assert broken != header
    fake = gadgetron("zerofill")
    fake.accept()
    fake.send_config_and_header(CONFIGURATION, broken)
    messages = fake.read_until_close()
    assert len(messages) == 2 and isinstance(messages[0], protocol.Error), messages
    assert "pisf chain 'zerofill' failed" in messages[0].text
    assert "empty matrix" in messages[0].text
    assert isinstance(messages[1], protocol.Close)
    assert fake.wait(20) == 1, fake.output()  # a failed scan's process ends at once, with status 1


def test_acquisition_contradicting_the_header_sends_error_and_the_process_ends(scan_raw, gadgetron):
    header, acquisitions = read_raw(scan_raw)
    noise = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    lines = [a for a in acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    bad = lines[5]
    bad.idx.kspace_encode_step_1 = 500  # the header's limits are 0..127
    fake = gadgetron("zerofill")
    sock = fake.accept()
    fake.send_config_and_header(CONFIGURATION, header)
    # No CLOSE after the bad line: the Python side stops reading at the error.
    sock.sendall(b"".join(protocol.frame_acquisition(a) for a in noise + lines[:5] + [bad]))
    messages = fake.read_until_close()
    assert len(messages) == 2 and isinstance(messages[0], protocol.Error), messages
    assert "kspace_encode_step_1 = 500" in messages[0].text and "0..127" in messages[0].text
    assert isinstance(messages[1], protocol.Close)
    assert fake.wait(20) == 1, fake.output()


def test_gadgetron_going_away_mid_scan_ends_the_process(scan_raw, gadgetron):
    """gadgetron-python alone reads a closed socket for ever (recv() == b"" in a loop, at full CPU)."""
    header, acquisitions = read_raw(scan_raw)
    fake = gadgetron("zerofill")
    sock = fake.accept()
    fake.send_config_and_header(CONFIGURATION, header)
    sock.sendall(b"".join(protocol.frame_acquisition(a) for a in acquisitions[:20]))
    sock.shutdown(socket.SHUT_RDWR)  # Gadgetron fails elsewhere and closes this node's socket
    sock.close()
    started = time.monotonic()
    assert fake.wait(20) == 1, fake.output()
    assert time.monotonic() - started < 20
    assert "Gadgetron closed the connection" in fake.output()


def test_worker_answers_failing_connections_and_carries_on(scan_raw, tmp_path):
    """A broken header gets ERROR + CLOSE, a peer that closes or stays silent is let go (no thread
    left spinning or waiting), and the next scan is served; the worker then ends when told to."""
    header, acquisitions = read_raw(scan_raw)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())",
                                   "gadgetron-worker", "--port", str(port), "--host", "127.0.0.1", "--chain", "zerofill",
                                   "--opening-timeout", "2", "--max-connections", "4"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while b"listening" not in log_path.read_bytes():
                assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.1)

            def connect() -> socket.socket:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.settimeout(30)
                return sock

            def until_close(sock) -> list:
                reader, messages = protocol.MessageReader(protocol.socket_reader(sock)), []
                while not messages or not isinstance(messages[-1], protocol.Close):
                    messages.append(reader.read())
                return messages

            def config_and_header(text: str) -> bytes:
                return b"".join(struct.pack("<HI", mid, len(raw)) + raw for mid, raw in
                                ((protocol.CONFIG_TEXT, CONFIGURATION.encode()), (protocol.HEADER, text.encode())))

            with connect() as sock:  # a header that breaks the chain
                sock.sendall(config_and_header(header.replace("<x>256</x>", "<x>0</x>", 1)))
                messages = until_close(sock)
            assert isinstance(messages[0], protocol.Error) and "empty matrix" in messages[0].text, messages
            with connect() as sock:  # Gadgetron connects and goes away before its header
                sock.sendall(struct.pack("<H", protocol.CONFIG_TEXT))
            silent = connect()  # connects and says nothing: cut off after --opening-timeout
            started = time.monotonic()
            assert isinstance(until_close(silent)[0], protocol.Error)
            assert time.monotonic() - started < 10
            silent.close()
            with connect() as sock:  # and the next scan is served
                sock.sendall(config_and_header(header) + b"".join(protocol.frame_acquisition(a) for a in acquisitions)
                             + protocol.frame_close())
                messages = until_close(sock)
            assert len([m for m in messages if isinstance(m, ismrmrd.Image)]) == 2, messages
            assert worker.wait(20) == 0, log_path.read_text(errors="replace")  # no connection thread left behind
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
