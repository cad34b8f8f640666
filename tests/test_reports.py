"""The physicist's report (tools/session/report.py) and where `pisf replay` writes it: a row per image
(every repetition), one report per output group, no files of an earlier report left beside new
metrics, series named by method, an aligned console table, the 3D partition named, and the ground
truth of ismrmrd-tools' generator files."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess

import ismrmrd
import numpy as np
import pytest

from gadgets.wire.client import ReceivedImage, replay
from tools import cli
from tools.rawdata.groundtruth import GroundTruth, read_groundtruth
from tools.rawdata.simulate import simulate
from tools.session import report as report_module
from tools.session.report import (ImageKey, compute_rows, format_table, panels_from_images, series_labels,
                                  write_report)

pytestmark = pytest.mark.timeout(180)
GENERATOR = "ismrmrd_generate_cartesian_shepp_logan"


def made_image(data, *, slice_=0, phase=0, repetition=0, series=1, method=None, index=0) -> ReceivedImage:
    """An ismrmrd.Image as a chain sends it: data [z, y, x], indices, series, PISF_Method meta."""
    data = np.asarray(data, np.float32)
    image = ismrmrd.Image.from_array(data if data.ndim == 3 else data[None], transpose=False)
    image.slice, image.phase, image.repetition = slice_, phase, repetition
    image.image_series_index, image.image_index = series, index
    meta = ismrmrd.Meta({"WindowCenter": "0.5", "WindowWidth": "1.0"})
    if method:
        meta["PISF_Method"] = method
    image.attribute_string = meta.serialize()
    return ReceivedImage(image, 0.01 * (index + 1))


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def generated(tmp_path, *options) -> str:
    if shutil.which(GENERATOR) is None:
        pytest.skip(f"{GENERATOR} not installed (Debian package ismrmrd-tools)")
    path = tmp_path / "generated.h5"   # a fresh name: the generator appends to an existing file
    subprocess.run([GENERATOR, "-o", str(path), *map(str, options)], check=True, capture_output=True)
    return path


# ---------------------------------------------------------------- every image a row

def test_four_repetitions_give_four_rows(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 1.0, (16, 16))
    received = [made_image(truth + 0.01 * rng.standard_normal(truth.shape), repetition=r, index=r) for r in range(4)]
    report = write_report(tmp_path, panels_from_images(received, "zerofill"),
                          GroundTruth(rss=truth[None, None].astype(np.float32)), "four repetitions")
    assert [(r["slice"], r["phase"], r["repetition"]) for r in report.rows] == [(0, 0, r) for r in range(4)]
    assert all(r["psnr_db"] > 30 for r in report.rows)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["repetition"] for row in rows] == ["0", "1", "2", "3"]
    assert len(json.loads((tmp_path / "metrics.json").read_text())["rows"]) == 4
    assert "repetition" in format_table(report.rows).splitlines()[0]


def test_images_with_the_same_indices_keep_their_rows():
    received = [made_image(np.ones((8, 8)), index=n) for n in range(2)]   # e.g. an unaveraged chain
    rows, _ = compute_rows(panels_from_images(received, "odd"), None)
    assert [r["copy"] for r in rows] == [0, 1]


# ---------------------------------------------------------------- series named by method

def test_series_are_named_by_the_method_their_images_carry():
    received = []
    for s in range(2):
        received.append(made_image(np.ones((8, 8)), slice_=s, series=2, method="PISF", index=s))
        received.append(made_image(np.ones((8, 8)), slice_=s, series=3, method="GRAPPA", index=s))
    assert series_labels(received, "pisf_compare") == {2: "pisf", 3: "grappa"}
    assert series_labels(received, "pisf_compare", qualify=True) == {2: "pisf (pisf_compare)",
                                                                     3: "grappa (pisf_compare)"}
    # one series keeps the chain's name; a PISF series with a SENSE fallback image stays "pisf"
    received.append(made_image(np.ones((8, 8)), slice_=2, series=2, method="SENSE", index=2))
    assert series_labels(received[:1], "pisf") == {2: "pisf"}
    assert series_labels(received, "pisf_compare")[2] == "pisf"
    rows, _ = compute_rows(panels_from_images(received, "pisf_compare"), None)
    assert {(r["chain"], r["method"]) for r in rows} == {("pisf", "pisf"), ("pisf", "sense"), ("grappa", "grappa")}


def test_console_table_columns_line_up_for_long_labels():
    truth = np.linspace(0.1, 1.0, 64).reshape(8, 8)
    received = [made_image(truth, series=2, method="PISF"), made_image(truth * 0.9, series=3, method="GRAPPA")]
    panels = panels_from_images(received, "pisf_compare", qualify=True)
    table = format_table(compute_rows(panels, GroundTruth(rss=truth[None, None]))[0]).splitlines()
    header, rows = table[0], table[1:3]
    assert {len(line) for line in rows} == {len(header)}
    for line in rows:    # PSNR column ends where its header does
        assert line[header.index("PSNR dB") + len("PSNR dB") - 1] != " "


# ---------------------------------------------------------------- report files

def test_a_new_report_removes_the_earlier_reports_figures(tmp_path):
    six = [made_image(np.ones((8, 8)) * (s + 1), slice_=s, index=s) for s in range(6)]
    write_report(tmp_path, panels_from_images(six, "zerofill"), None, "six slices")
    assert len(list(tmp_path.glob("compare_slice*.png"))) == 6
    (tmp_path / "notes.txt").write_text("mine")
    report = write_report(tmp_path, panels_from_images(six[:2], "zerofill"), None, "two slices")
    assert sorted(p.name for p in tmp_path.glob("compare_slice*.png")) == ["compare_slice000.png",
                                                                          "compare_slice001.png"]
    assert (tmp_path / "notes.txt").read_text() == "mine"     # only the report's own files go
    assert any("earlier report" in note for note in report.notes)


def test_3d_compare_names_the_partition_shown(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(report_module, "compare_figure", lambda path, panels, key, truth, rows, title: titles.append(
        (title, [p.partition for images in panels.values() for p in images.values()])))
    volume = np.arange(8 * 6 * 6, dtype=np.float32).reshape(8, 6, 6)
    panels = panels_from_images([made_image(volume)], "zerofill")
    assert next(iter(panels["zerofill"].values())).partition == (4, 8)
    write_report(tmp_path, panels, None, "3D")
    assert "partition 4 of 8" in titles[0][0] and titles[0][1] == [(4, 8)]


# ---------------------------------------------------------------- through the server

def test_every_replay_into_one_file_gets_its_own_report(capsys, tmp_path, server):
    raw = tmp_path / "two_slices.h5"
    simulate(raw, matrix=32, coils=4, accel=2, acs=8, slices=2, noise=0.002, seed=6)
    out = tmp_path / "images.h5"
    for chain, group in (("zerofill", "first"), ("grappa", "second"), ("zerofill", "first")):
        code, stdout, err = run_cli(capsys, "replay", raw, "--port", server.address[1], "-c", chain, "-o", out,
                                    "-G", group)
        assert code == 0, err
    for group, chains in (("first", {"zerofill"}), ("second", {"zero-filled (local)", "grappa"})):
        metrics = json.loads((tmp_path / "images_report" / group / "metrics.json").read_text())
        assert {r["chain"] for r in metrics["rows"]} == chains
        assert len(metrics["rows"]) == 2 * len(chains)
    assert sorted(p.name for p in (tmp_path / "images_report").iterdir()) == ["first", "second"]


def test_pisf_compare_series_and_progress(capsys, tmp_path, server):
    raw = tmp_path / "compare.h5"
    simulate(raw, matrix=64, coils=4, accel=4, acs=12, slices=3, noise=0.002, seed=7)   # in PISF's trained range
    result = replay(raw, *server.address, config="pisf_compare", progress=True)
    err = capsys.readouterr().err
    if result.errors:
        pytest.skip(f"pisf_compare not usable here: {result.errors[0]}")
    assert len(result.images) == 6
    assert "6/6" in err and "3/3" not in err and "4/4" not in err   # the total never grew image by image
    assert set(panels_from_images(result.images, "pisf_compare")) == {"pisf", "grappa"}
    assert set(panels_from_images(result.images, "pisf_compare", qualify=True)) == {"pisf (pisf_compare)",
                                                                                    "grappa (pisf_compare)"}


def test_generator_phantom_is_the_ground_truth_of_a_four_repetition_scan(capsys, tmp_path, server):
    raw = generated(tmp_path, "-m", 64, "-c", 4, "-r", 4, "-n", 0.001, "-C")
    truth = read_groundtruth(raw)
    assert truth is not None and truth.path == "/dataset/phantom" and truth.rss.shape == (1, 1, 64, 64)
    out = tmp_path / "images.h5"
    code, stdout, err = run_cli(capsys, "replay", raw, "--port", server.address[1], "-c", "zerofill", "-o", out,
                                "-G", "reps")
    assert code == 0, err
    assert "/dataset/phantom" in stdout
    rows = list(csv.DictReader(open(tmp_path / "images_report" / "reps" / "metrics.csv")))
    assert [(row["slice"], row["repetition"]) for row in rows] == [("0", str(r)) for r in range(4)]
    # fully sampled, low noise, prewhitened like the chain: the generator's own truth at >= 40 dB
    assert all(float(row["psnr_db"]) >= 40 for row in rows), [row["psnr_db"] for row in rows]


def test_ground_truth_of_generator_files_without_noise_readouts(tmp_path):
    raw = generated(tmp_path, "-m", 32, "-c", 2, "-n", 0.0)
    truth = read_groundtruth(raw)
    assert "prewhitened" not in truth.attrs["source"] and truth.rss.max() > 0
    assert read_groundtruth(raw, group=None) is None   # only the raw data's own group is looked at
