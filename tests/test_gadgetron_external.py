"""Our external-gadget targets driven by gadgetron-python's own Connection, launched as Gadgetron does.

The test plays Gadgetron: it binds a loopback port, runs `python -m gadgetron <port>
gadgets.gadgetron_external.targets zerofill`, accepts the connection, sends CONFIG (id 2, the
<configuration> element), HEADER (id 3), the acquisitions (id 1008) and CLOSE, and reads back
what the Python side sends (images 1022, ERROR 8, CLOSE 4).
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.wire import protocol
from gadgets.wire.client import read_raw, replay

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


def test_zerofill_target_matches_the_embedded_server(server, shepp_logan_raw, gadgetron):
    header, acquisitions = read_raw(shepp_logan_raw)
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

    embedded = replay(shepp_logan_raw, *server.address, config="zerofill", timeout_s=60)
    assert embedded.error is None and embedded.closed and embedded.errors == []
    embedded_images = [r.image for r in embedded.images]
    assert len(external) == len(embedded_images) == 4

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


def test_header_that_breaks_the_chain_sends_error_before_close(shepp_logan_raw, gadgetron):
    header, _ = read_raw(shepp_logan_raw)
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
    fake.wait()


def test_acquisition_contradicting_the_header_sends_error_before_close(shepp_logan_raw, gadgetron):
    header, acquisitions = read_raw(shepp_logan_raw)
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
    fake.wait()
