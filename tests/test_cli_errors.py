"""What a new user meets when things go wrong (issue 20, items 4-7): Ctrl-C keeps the images
already received, a refused chain stops the sending at the server's first ERROR and is said once,
every error is one line `pisf SUB: error: what is wrong; what to do` (a traceback only with
PISF_TRACEBACK=1), a twix file is named as such, and `pisf replay` runs the server's default chain."""
from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from gadgets.wire.client import read_raw
from tests.conftest import REPO
from tools import cli
from tools.rawdata.simulate import simulate

pytestmark = pytest.mark.timeout(120)

ERROR_LINE = re.compile(r"^pisf (?P<command>[a-z-]+): error: (?P<what>[^;\n]+); (?P<todo>[^\n]+)$")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(err: str) -> list[str]:
    """stderr without the progress bars (tqdm's redraws and cursor moves)."""
    return [line for line in err.splitlines() if line.strip() and "%|" not in line and not line.startswith("\x1b")]


@pytest.fixture(scope="module")
def paced_raw(tmp_path_factory):
    """Three slices of 20 lines, one line per 40 ms of time stamps: --realtime sends for ~2.4 s."""
    path = tmp_path_factory.mktemp("paced") / "paced.h5"
    simulate(path, matrix=32, coils=2, accel=2, acs=8, slices=3, sequence="gre", tr=40.0, noise=0.01, seed=3)
    return path


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "small.h5"
    simulate(path, matrix=32, coils=2, accel=2, acs=8, slices=2, noise=0.01, seed=2)
    return path


# ---------------------------------------------------------------- item 4: Ctrl-C keeps what arrived

def test_ctrl_c_keeps_the_images_received_and_says_how_many(server, paced_raw, tmp_path):
    total = len(read_raw(paced_raw)[1])
    out = tmp_path / "kept" / "images.h5"
    replay = subprocess.Popen([sys.executable, "-m", "tools.cli", "replay", str(paced_raw), "-p",
                               str(server.address[1]), "-c", "zerofill", "--realtime", "-o", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in replay.stdout:  # interrupt once the first slice's image has arrived
        if line.startswith("image "):
            break
    else:
        pytest.fail(f"no image before the end: {replay.communicate()}")
    interrupted_at = time.monotonic()
    replay.send_signal(signal.SIGINT)
    _, err = replay.communicate(timeout=30)
    assert replay.returncode == 130
    assert time.monotonic() - interrupted_at < 3.0  # fast, as before
    [line] = lines_of(err)
    said = re.fullmatch(r"pisf replay: interrupted after sending (\d+) of (\d+) acquisitions; (\d+) images? "
                        r"received, kept in (\S+) group '(\S+)'", line)
    assert said, line
    sent, of, received = (int(said[i]) for i in (1, 2, 3))
    assert of == total and 0 < sent < total and 1 <= received < 3
    with h5py.File(out, "r") as h5:
        assert list(h5.keys()) == [said[5]]
        assert sum(h5[said[5]][name]["data"].shape[0] for name in h5[said[5]]) == received


def test_ctrl_c_without_out_says_the_images_were_not_kept(server, paced_raw, monkeypatch, capsys):
    from gadgets.wire import client

    def interrupted_sender(send, result, *args):
        result.images.append("an image")  # as if one had arrived, then the user pressed Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "_send_scan", interrupted_sender)
    code, _, err = run_cli(capsys, "replay", paced_raw, "-p", server.address[1], "-c", "zerofill")
    assert code == 130
    total = len(read_raw(paced_raw)[1])
    assert lines_of(err) == [f"pisf replay: interrupted after sending 0 of {total} acquisitions; 1 image received; "
                             "not kept (give -o FILE to keep what arrives)"]


# ---------------------------------------------------------------- item 5: stop at the first ERROR, say it once

@pytest.mark.parametrize("argv, refusal", [
    (["-c", "nosuchchain"], "unknown config 'nosuchchain'; available: "),
    (["-c", "zerofill", "--parameters", '{"parameters": {"seriesindex": "abc"}}'],
     "JSON parameter 'seriesindex' = 'abc': expected an integer"),
])
def test_a_refused_chain_or_parameter_stops_the_sending_and_is_said_once(server, paced_raw, capsys, argv, refusal):
    total = len(read_raw(paced_raw)[1])
    started = time.monotonic()
    code, out, err = run_cli(capsys, "replay", paced_raw, "-p", server.address[1], "--realtime", *argv)
    assert code == 1
    assert time.monotonic() - started < 2.0  # paced sending of all lines takes ~2.4 s
    sent = re.search(r"sent (\d+) acquisitions \(of (\d+); stopped at the server's ERROR\)", out)
    assert sent, out
    assert int(sent[2]) == total and int(sent[1]) < total
    assert "server: ERROR" not in out and refusal.split(";")[0] not in out  # not on stdout as well
    [line] = lines_of(err)
    assert line.startswith(f"pisf replay: error: the server refused the scan: {refusal}"), line
    assert ERROR_LINE.match(line), line


# ---------------------------------------------------------------- item 6: one error format everywhere

def _twix_like(path):
    """The start of a Siemens VB twix file: header length, then the `Config` buffer."""
    path.write_bytes(struct.pack("<II", 20_000, 1) + b"Config\0" + bytes(20_000 - 15) + bytes(4096))
    return path


def _cases(tmp_path, small_raw):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(small_raw.read_bytes()[:20_000])
    notes = tmp_path / "notes.txt"
    notes.write_text("not data\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "truncated raw": (["replay", truncated, "-c", "zerofill"],
                          f"{truncated} is truncated (20000 of {small_raw.stat().st_size} bytes); copy it again"),
        "dicom of a text file": (["dicom", notes, "--out", tmp_path / "dcm"],
                                 f"{notes} is not an HDF5 file; give an ISMRMRD HDF5 file"),
        "dicom of raw data": (["dicom", small_raw, "--out", tmp_path / "dcm"],
                              f"{small_raw} holds ISMRMRD raw data, not images; reconstruct it first"),
        "dicom of a truncated file": (["dicom", truncated, "--out", tmp_path / "dcm"],
                                      f"{truncated} is truncated (20000 of"),
        "convert of a text file": (["convert", notes, "--out", tmp_path / "c.h5"],
                                   f"{notes}: unknown layout: not a Siemens twix file"),
        "convert of a missing file": (["convert", tmp_path / "none.dat", "--out", tmp_path / "c.h5"],
                                      f"{tmp_path / 'none.dat'}: no such file; check the path"),
        "convert with --acs alone": (["convert", notes, "--out", tmp_path / "c.h5", "--acs", "8"],
                                     "--reference and --acs apply to --undersample; add --undersample MASK"),
        "simulate into a file's path": (["simulate", "--out", a_file / "x.h5", "--matrix", "32"],
                                        f"{a_file} is a file, not a directory"),
        "replay of a twix file": (["replay", _twix_like(tmp_path / "meas_MID42.dat")],
                                  f"this is Siemens raw data (twix), not ISMRMRD ({tmp_path / 'meas_MID42.dat'}); "
                                  f"convert it with `pisf convert {tmp_path / 'meas_MID42.dat'} --out "
                                  f"meas_MID42_ismrmrd.h5`"),
    }


CASES = ["truncated raw", "dicom of a text file", "dicom of raw data", "dicom of a truncated file",
         "convert of a text file", "convert of a missing file", "convert with --acs alone",
         "simulate into a file's path", "replay of a twix file"]


@pytest.mark.parametrize("case", CASES)
def test_every_error_is_one_line_what_is_wrong_and_what_to_do(capsys, monkeypatch, tmp_path, small_raw, case):
    monkeypatch.delenv("PISF_TRACEBACK", raising=False)
    argv, expected = _cases(tmp_path, small_raw)[case]
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert "Traceback" not in out + err
    [line] = lines_of(err)
    match = ERROR_LINE.match(line)
    assert match and match["command"] == argv[0], line
    assert line.startswith(f"pisf {argv[0]}: error: {expected}"), line


def test_unexpected_failures_show_the_traceback_only_when_asked(capsys, monkeypatch, tmp_path):
    """convert's catch-all too: it used to hide the traceback even with PISF_TRACEBACK=1."""
    import tools.rawdata.convert

    def reader_trips(*args, **kwargs):
        raise IndexError("index 7 is out of bounds for axis 0 with size 3")

    monkeypatch.setattr(tools.rawdata.convert, "convert", reader_trips)
    argv = ["convert", tmp_path / "in.dat", "--out", tmp_path / "out.h5"]
    monkeypatch.delenv("PISF_TRACEBACK", raising=False)
    code, _, err = run_cli(capsys, *argv)
    assert code != 0 and "Traceback" not in err
    [line] = lines_of(err)
    assert ERROR_LINE.match(line) and "cannot convert (IndexError: index 7 is out of bounds" in line, line
    monkeypatch.setenv("PISF_TRACEBACK", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code != 0 and "Traceback (most recent call last)" in err and "in reader_trips" in err, err
    assert err.splitlines()[-1] == line  # the one line still ends it


# ---------------------------------------------------------------- item 7: default chain, directories

def test_replay_without_c_runs_the_servers_default_chain(server, small_raw, tmp_path, capsys):
    out = tmp_path / "images.h5"
    code, stdout, err = run_cli(capsys, "replay", small_raw, "-p", server.address[1], "-o", out, "--no-report")
    if code != 0 and "pisf" in err:
        pytest.skip(f"pisf chain not usable here: {lines_of(err)}")
    assert code == 0, err
    with h5py.File(out, "r") as h5:
        [group] = list(h5.keys())
    assert group.startswith("pisf_pisf_")  # the server's default chain (ReconServer default_chain="pisf")
    assert "image_2" in h5py.File(out, "r")[group]  # pisf's series, not zerofill's image_1


def test_a_missing_output_directory_is_made_and_announced(capsys, tmp_path):
    out = tmp_path / "new" / "deeper" / "raw.h5"
    code, stdout, _ = run_cli(capsys, "simulate", "--out", out, "--matrix", "32", "--coils", "2")
    assert code == 0 and out.is_file()
    assert f"created directory {out.parent}" in stdout.splitlines()


# ---------------------------------------------------------------- the loose ends: serve, bench-model, demo, convert

@pytest.mark.parametrize("argv, expected", [
    (["--port", "70000"], "--port 70000 is not a TCP port; choose one in 0..65535"),
    (["--tls-key", "key.pem"], "--tls-key was given without --tls-cert; add --tls-cert"),
    (["--tls-cert", "{tmp}/none.pem"],
     "cannot load the TLS certificate/key ({tmp}/none.pem, key in cert): No such file or directory; give a PEM"),
    (["--default-chain", "nosuch"], "--default-chain 'nosuch' is not a chain in "),
    (["--config-dir", "{tmp}"], "no chains in {tmp}; put chain YAML files"),
    (["--config-dir", "{tmp}/none"], "--config-dir {tmp}/none: no such directory; give the directory"),
    (["--max-connections", "0"], "--max-connections 0 would turn every scan away; give 1 or more"),
    (["--io-timeout", "0"], "--io-timeout 0: a client may not be silent for 0 s or less"),
    (["--max-message-mb", "-1"], "--max-message-mb -1 admits no frame"),
    (["--max-slices-in-flight", "0"], "--max-slices-in-flight 0 admits no slice; give 1 or more"),
    (["--server-budget-mib", "0"], "--connection-budget-mib 256 / --server-budget-mib 0: a budget of 0 or less"),
    (["--malloc-arenas", "-1"], "--malloc-arenas -1 is negative; give 0"),
])
def test_serve_startup_errors_say_what_to_do(capsys, tmp_path, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, "serve", "--port", "0", *argv)
    assert code == 2
    [line] = lines_of(err)
    assert ERROR_LINE.match(line), line
    assert line.startswith(f"pisf serve: error: {expected.replace('{tmp}', str(tmp_path))}"), line


def test_serve_on_a_port_in_use_says_what_to_do(capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        code, _, err = run_cli(capsys, "serve", "--port", taken.getsockname()[1])
    [line] = lines_of(err)
    assert code == 2 and ERROR_LINE.match(line) and "choose another with --port" in line, line


@pytest.mark.parametrize("argv, expected", [
    (["bench-model", "{tmp}/none.onnx"], "{tmp}/none.onnx: no such file; give an ONNX model"),
    (["bench-model", "{tmp}/m.onnx:nosuch=1"], "model option 'nosuch=1'"),
    (["demo", "--slices", "0", "--out", "{tmp}/demo"], "--slices 0: must be at least 1; see `pisf demo --help`"),
    (["demo", "--matrix", "15", "--out", "{tmp}/demo"], "--matrix 15: must be even and at least 16"),
    (["demo", "--chains", "nosuch", "--out", "{tmp}/demo"], "unknown chain(s) nosuch; choose from "),
    (["demo", "--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file; give a directory"),
])
def test_more_commands_refuse_bad_values_in_one_line(capsys, tmp_path, argv, expected):
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    [line] = lines_of(err)
    assert ERROR_LINE.match(line), line
    assert line.startswith(f"pisf {argv[0]}: error: {expected.replace('{tmp}', str(tmp_path))}"), line
    assert not (tmp_path / "demo").exists() and "simulating" not in out  # refused before any work


def test_convert_warnings_carry_the_command_name(capsys, tmp_path):
    """A BART file 2D-undersampled within lines converts with a warning (no ground truth)."""
    kspace = np.zeros((1, 16, 12, 2), dtype=np.complex64)
    kspace[0, ::2, :, :] = 1.0  # every other readout sample: holes inside the lines
    base = tmp_path / "holes"
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, kspace.shape)) + "\n")
    kspace.ravel(order="F").tofile(base.with_suffix(".cfl"))
    code, _, err = run_cli(capsys, "convert", base.with_suffix(".cfl"), "--out", tmp_path / "c.h5")
    assert code == 0, err
    warnings = lines_of(err)
    assert warnings and all(line.startswith("pisf convert: warning: ") for line in warnings), warnings


# ---------------------------------------------------------------- created_directory in every command writing files

class _Stop(BaseException):
    """Raised by a stand-in right after the output directory is made: the rest of the command is not the point."""


def _stop(*args, **kwargs):
    raise _Stop


def test_every_command_writing_files_makes_its_missing_directory_and_says_so(capsys, monkeypatch, tmp_path):
    import types

    import tools.bench.server
    import tools.evaluation.classical_table
    import tools.evaluation.datasets
    import tools.rawdata.simulate
    from tools.evaluation.harness import run_evaluation
    from tools.training.export import export_model
    from tools.training.train import TrainingRun

    def announced(path) -> bool:
        out, _ = capsys.readouterr()
        return path.is_dir() and f"created directory {path}" in out.splitlines()

    monkeypatch.setattr(tools.rawdata.simulate, "simulate", _stop)      # demo: after its --out is made
    with pytest.raises(_Stop):
        cli.main(["demo", "--out", str(tmp_path / "demo" / "run"), "--matrix", "32", "--chains", "zerofill"])
    assert announced(tmp_path / "demo" / "run")

    monkeypatch.setattr(tools.bench.server, "_bench_data", _stop)
    with pytest.raises(_Stop):
        tools.bench.server.run_bench(tmp_path / "bench" / "run", chains=("zerofill",), use_shared=False)
    assert announced(tmp_path / "bench" / "run")

    run_evaluation([], {}, tmp_path / "eval" / "run", use_bart=False, figure=False, log=lambda *_: None)
    assert announced(tmp_path / "eval" / "run")

    monkeypatch.setattr(tools.evaluation.datasets, "load_datasets", lambda *args: [])
    monkeypatch.setattr(tools.evaluation.classical_table, "lambda_study", lambda datasets: "table\n")
    assert cli.main(["classical-table", "--lambda-study", str(tmp_path / "lambda" / "run")]) == 0
    assert announced(tmp_path / "lambda" / "run")
    assert (tmp_path / "lambda" / "run" / "lambda_study.md").read_text() == "table\n"

    assert cli.main(["fuzz", "--frames", "2", "--loopback", "0", "--json", str(tmp_path / "fuzz" / "r.json")]) == 0
    assert announced(tmp_path / "fuzz") and (tmp_path / "fuzz" / "r.json").is_file()

    pytest.importorskip("torch")
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(coils=2), eval=lambda: model)
    monkeypatch.setattr("torch.onnx.export", _stop)
    with pytest.raises(_Stop):
        export_model(model, tmp_path / "export" / "models" / "m.onnx", {})
    assert announced(tmp_path / "export" / "models")

    monkeypatch.setattr("tools.training.train.pick_device", _stop)  # just after the run folder is made
    with pytest.raises(_Stop):
        TrainingRun({"model": {}}, tmp_path / "train" / "run")
    assert announced(tmp_path / "train" / "run")
