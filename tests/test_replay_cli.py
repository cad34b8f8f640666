"""`pisf replay`, `serve`, `simulate` as a new user meets them: ordinary mistakes end in one line and a
non-zero exit (never a traceback), --help shows defaults, -g picks the input group, images of
different sizes in one series are all written, and the physicist's outputs appear."""
from __future__ import annotations

import csv
import json
import socket
import threading

import h5py
import ismrmrd
import numpy as np
import pytest
from PIL import Image

from gadgets.wire import protocol
from gadgets.wire.client import expected_images, plan_image_arrays, read_raw, replay
from tools import cli
from tools.rawdata.simulate import simulate

pytestmark = pytest.mark.timeout(120)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "small.h5"
    simulate(path, matrix=32, coils=2, accel=2, acs=8, slices=2, noise=0.01, seed=2)
    return path


@pytest.fixture(scope="module")
def cine_raw(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "cine.h5"
    simulate(path, matrix=32, coils=2, accel=2, acs=8, slices=1, phases=3, noise=0.01, seed=4)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- ordinary mistakes, one line each

def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "replay", tmp_path / "nope.h5")
    assert_one_line_error(code, err, "pisf replay: error:", "nope.h5: no such file")


def test_text_file(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not raw data\n")
    code, _, err = run_cli(capsys, "replay", text)
    assert_one_line_error(code, err, "notes.txt is a text file", "not an ISMRMRD raw data file")


def test_binary_file_that_is_not_hdf5(capsys, tmp_path):
    blob = tmp_path / "blob.dat"
    blob.write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "replay", blob)
    assert_one_line_error(code, err, "blob.dat is not HDF5")


def test_hdf5_that_is_not_ismrmrd(capsys, tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["kspace"] = np.zeros((2, 4, 8), np.complex64)
    code, _, err = run_cli(capsys, "replay", path)
    assert_one_line_error(code, err, "other.h5 is HDF5 but holds no ISMRMRD raw data", "kspace")


def test_server_not_running_says_how_to_start_one(capsys, small_raw):
    port = free_port()
    code, _, err = run_cli(capsys, "replay", small_raw, "--port", port)
    assert_one_line_error(code, err, f"no server is listening on 127.0.0.1:{port}",
                          f"start one with `pisf serve --port {port}`")


@pytest.mark.parametrize("option", ["--png", "--report", "--dicom"])
def test_output_directory_option_naming_a_file(capsys, tmp_path, small_raw, option):
    existing = tmp_path / "out.png"
    existing.write_bytes(b"x")
    code, _, err = run_cli(capsys, "replay", small_raw, option, existing)
    assert_one_line_error(code, err, f"{option} {existing} is a file; give a directory")


def test_out_naming_a_directory_or_a_foreign_file(capsys, tmp_path, small_raw):
    code, _, err = run_cli(capsys, "replay", small_raw, "--out", tmp_path)
    assert_one_line_error(code, err, "is a directory; give a file name")
    foreign = tmp_path / "notes.h5"
    foreign.write_text("mine")
    code, _, err = run_cli(capsys, "replay", small_raw, "--out", foreign)
    assert_one_line_error(code, err, "exists and is not an HDF5 file; not overwriting it")
    assert foreign.read_text() == "mine"


def test_bad_parameters_json(capsys, small_raw):
    code, _, err = run_cli(capsys, "replay", small_raw, "--parameters", "{config: zerofill}")
    assert_one_line_error(code, err, "--parameters is not valid JSON")


def test_missing_config_file(capsys, tmp_path, small_raw):
    code, _, err = run_cli(capsys, "replay", small_raw, "-C", tmp_path / "chain.xml")
    assert_one_line_error(code, err, "--config-file", "no such file")


def test_serve_on_a_port_in_use(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--port", port)
    assert_one_line_error(code, err, f"port {port} on 127.0.0.1 is already in use", "--port")


def test_serve_with_a_missing_config_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "serve", "--port", 0, "--config-dir", tmp_path / "none")
    assert_one_line_error(code, err, "--config-dir", "no such directory")


@pytest.mark.parametrize("argv, fragment", [
    (["--matrix", "15"], "--matrix 15: must be even and at least 16"),
    (["--coils", "0"], "--coils 0: must be at least 1"),
    (["--partial-fourier", "0.3"], "--partial-fourier 0.3: must be in 0.5..1"),
    (["--noise", "-1"], "--noise -1.0: must be 0 or more"),
    (["--matrix", "32", "--acs", "30", "--partial-fourier", "0.6"], "partial Fourier would cut the ACS block"),
])
def test_invalid_simulate_values(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, "simulate", "--out", tmp_path / "x.h5", *argv)
    assert_one_line_error(code, err, "pisf simulate: error:", fragment)
    assert not (tmp_path / "x.h5").exists()


def test_simulate_out_is_a_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", "--out", tmp_path)
    assert_one_line_error(code, err, "is a directory")


def test_unexpected_failures_are_one_line_too(capsys, monkeypatch, small_raw):
    import tools.session.replay

    def boom(args):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(tools.session.replay, "run", boom)
    monkeypatch.delenv("PISF_TRACEBACK", raising=False)
    code, _, err = run_cli(capsys, "replay", small_raw)
    assert_one_line_error(code, err, "pisf replay: error: RuntimeError: something nobody foresaw", "PISF_TRACEBACK=1")


# ---------------------------------------------------------------- --help

@pytest.mark.parametrize("command, shown", [
    ("replay", ["(default: 9002)", "(default: the server's default chain", "(default: 127.0.0.1)", "-g GROUP",
                "(default: 600.0)"]),
    ("serve", ["(default: 9002)", "(default: 16)", "(default: 300.0)", "(default: INFO)"]),
    ("simulate", ["(default: 256)", "(default: 8)", "(default: equispaced)", "(default: 0.02)"]),
    ("demo", ["(default: out/demo)", "(default: 6)", "(default: 1)"]),
])
def test_help_shows_defaults_and_every_option_has_help(command, shown):
    parser = cli.build_parser(command)
    sub = parser._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    for fragment in shown:
        assert fragment in " ".join(text.split()), (fragment, text)
    for action in sub._actions:
        assert action.help, f"pisf {command} {action.option_strings or action.dest} has no help text"


# ---------------------------------------------------------------- input group, output group, sizes

def test_input_group_option(capsys, tmp_path, server, small_raw):
    two = tmp_path / "two_groups.h5"
    with h5py.File(small_raw, "r") as src, h5py.File(two, "w") as dst:
        src.copy("dataset", dst, name="first")
        src.copy("dataset", dst, name="second")
    host, port = server.address
    code, _, err = run_cli(capsys, "replay", two, "--port", port)
    assert_one_line_error(code, err, "holds raw data in several groups (first, second); choose one with -g")
    code, _, err = run_cli(capsys, "replay", two, "--port", port, "-g", "third")
    assert_one_line_error(code, err, "no ISMRMRD raw data in group 'third'", "first, second")
    code, out, _ = run_cli(capsys, "replay", two, "--port", port, "-g", "second", "--no-report", "-c", "zerofill")
    assert code == 0 and "received 2 images" in out
    # a single group of another name is found without -g
    one = tmp_path / "renamed.h5"
    with h5py.File(small_raw, "r") as src, h5py.File(one, "w") as dst:
        src.copy("dataset", dst, name="scan_0042")
    header, acquisitions = read_raw(one, None)
    assert len(acquisitions) > 0


def test_default_output_group_name_is_shell_friendly(capsys, tmp_path, server, small_raw):
    out = tmp_path / "images.h5"
    code, stdout, _ = run_cli(capsys, "replay", small_raw, "--port", server.address[1], "-o", out, "--no-report",
                              "-c", "zerofill")
    assert code == 0
    with h5py.File(out, "r") as h5:
        [group] = list(h5.keys())
    assert group.startswith("pisf_zerofill_") and " " not in group and ":" not in group
    assert f"group '{group}'" in stdout


class ForeignServer(threading.Thread):
    """A server of someone else's: reads a scan, answers with images of two sizes in one series."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def run(self):
        sock, _ = self.listener.accept()
        with sock:
            reader = protocol.MessageReader(protocol.socket_reader(sock))
            while not isinstance(reader.read(), protocol.Close):
                pass
            for index, (shape, dtype) in enumerate([((32, 32), np.uint16), ((48, 24), np.uint16),
                                                     ((32, 32), np.uint16), ((32, 32), np.float32)]):
                image = ismrmrd.Image.from_array(np.full(shape, index + 1, dtype), transpose=False)
                image.image_series_index, image.image_index, image.slice = 1, index + 1, index
                sock.sendall(protocol.frame_image(image))
            sock.sendall(protocol.frame_close())
        self.listener.close()


def test_images_of_different_sizes_in_one_series_are_all_written(capsys, tmp_path, small_raw):
    foreign = ForeignServer()
    foreign.start()
    out, png = tmp_path / "foreign.h5", tmp_path / "png"
    code, stdout, err = run_cli(capsys, "replay", small_raw, "--port", foreign.port, "-o", out, "--png", png)
    foreign.join(10)
    assert code == 0, err
    assert "Traceback" not in err
    with h5py.File(out, "r") as h5:
        [group] = list(h5.keys())
        arrays = {name: h5[group][name]["data"].shape for name in h5[group]}
    # the first shape keeps FIRE's/Gadgetron's name; the others get arrays of their own
    assert arrays == {"image_1": (2, 1, 1, 32, 32), "image_1_24x48x1": (1, 1, 1, 48, 24),
                      "image_1_32x32x1": (1, 1, 1, 32, 32)}
    assert len(list(png.glob("*.png"))) == 4
    with ismrmrd.Dataset(str(out), group, create_if_needed=False) as dataset:
        assert dataset.read_image("image_1_24x48x1", 0).data.shape[-2:] == (48, 24)


def test_plan_respects_what_the_file_already_holds():
    image = ismrmrd.Image.from_array(np.zeros((8, 8), np.uint16), transpose=False)
    image.image_series_index = 2
    existing = {"image_2": ((1, 1, 4, 4), np.dtype(np.uint16))}
    assert list(plan_image_arrays([image], existing)) == ["image_2_8x8x1"]


# ---------------------------------------------------------------- progress, quality, report

def test_progress_counts_images_received_of_expected(capsys, server, cine_raw):
    header, acquisitions = read_raw(cine_raw)
    assert expected_images(acquisitions) == 3
    result = replay(cine_raw, *server.address, progress=True)
    assert result.closed and len(result.images) == 3
    err = capsys.readouterr().err
    assert "images" in err and "3/3" in err


def test_replay_prints_quality_and_writes_the_report(capsys, tmp_path, server, cine_raw):
    out = tmp_path / "cine_images.h5"
    code, stdout, err = run_cli(capsys, "replay", cine_raw, "--port", server.address[1], "-o", out, "-c", "zerofill")
    assert code == 0, err
    assert "quality against the ground truth" in stdout and "/dataset/pisf_groundtruth" in stdout
    assert "mean PSNR" in stdout and "mean SSIM" in stdout
    [report] = (tmp_path / "cine_images_report").iterdir()  # one report per output group
    metrics = json.loads((report / "metrics.json").read_text())
    assert {r["chain"] for r in metrics["rows"]} == {"zerofill"}
    assert len(metrics["rows"]) == 3 and all(r["psnr_db"] > 10 and 0 < r["ssim"] <= 1 for r in metrics["rows"])
    with open(report / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["slice"], r["phase"]) for r in rows] == [("0", "0"), ("0", "1"), ("0", "2")]
    compare = Image.open(report / "compare_slice000.png")
    assert min(compare.size) > 300                  # reference | zerofill over their error map
    gif = Image.open(report / "cine_slice000.gif")
    assert gif.n_frames == 3
    assert (report / "quality_latency.png").is_file()


def test_report_without_ground_truth_and_with_a_local_zero_filled_panel(capsys, tmp_path, server, small_raw):
    bare = tmp_path / "no_truth.h5"
    with h5py.File(small_raw, "r") as src, h5py.File(bare, "w") as dst:
        src.copy("dataset", dst)
        del dst["dataset/pisf_groundtruth"]
    report = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "replay", bare, "--port", server.address[1], "-c", "pisf",
                                "--report", report)
    if code != 0 and "ERROR" in stdout:
        pytest.skip(f"pisf chain not usable here: {stdout.splitlines()[-1]}")
    assert code == 0, err
    assert "quality against" not in stdout
    metrics = json.loads((report / "metrics.json").read_text())
    assert {r["chain"] for r in metrics["rows"]} == {"zero-filled (local)", "pisf"}
    assert all(r["psnr_db"] is None for r in metrics["rows"])
    assert (report / "compare_slice000.png").is_file() and (report / "compare_slice001.png").is_file()


def test_runtime_never_imports_matplotlib():
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import pkgutil, sys, importlib, gadgets\n"
            "for m in pkgutil.walk_packages(gadgets.__path__, 'gadgets.'):\n"
            "    importlib.import_module(m.name)\n"
            "import tools.session.replay\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
