"""Real-data evaluation harness: cases, undersampling, BART anchors, dataset loaders, reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools.evaluation import datasets as eval_data
from tools.evaluation.datasets import (SEPARATE_REFERENCE_LINES, Dataset, centre_lines, make_cases,
                             reference_from_kspace, sampled_lines, undersample)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _fft():
    from gadgets.numerics.fft import fftc, ifftc
    return fftc, ifftc


def synthetic_dataset(n: int = 48, coils: int = 4) -> Dataset:
    """A smooth disc with an inner ellipse under Gaussian coil sensitivities around the FOV."""
    fftc, _ = _fft()
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    obj = (x ** 2 + y ** 2 < 0.7).astype(np.float64) + 0.5 * ((x / 0.3) ** 2 + (y / 0.5) ** 2 < 1)
    obj = obj * np.exp(1j * 0.5 * x)
    angles = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack([np.exp(-((x - np.cos(a)) ** 2 + (y - np.sin(a)) ** 2) / 1.2) * np.exp(1j * a) for a in angles])
    kspace = fftc(maps * obj[None], axes=(-2, -1))
    rng = np.random.default_rng(1)
    kspace = kspace + 0.002 * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
    kspace = eval_data.normalised(kspace)
    return Dataset("synthetic", kspace, reference_from_kspace(kspace), "synthetic disc", "none")


# ----------------------------------------------------------------------------- cases
@pytest.mark.parametrize("ny", [96, 128, 256])
def test_cases_reach_their_acceleration(ny):
    cases = make_cases("any", ny)
    assert len(cases) == 13
    for case in cases:
        assert case.mask.dtype == np.float32 and case.mask.shape == (ny,)
        assert case.reference_lines.dtype == bool
        assert abs(case.r_achieved - case.R) / case.R <= 0.1, (case.name, case.r_achieved)
        if case.embedded:
            # the centre block is image data and is the calibration region
            assert np.all(case.mask[case.reference_lines] == 1)
            assert case.n_reference == centre_lines(ny, case.R)
            assert 4 <= case.n_reference <= 24
            assert case.mask.sum() - case.n_reference >= eval_data.MIN_OUTER_LINES


@pytest.mark.parametrize("ny", [96, 128, 256])
def test_separate_reference_cases(ny):
    separate = [c for c in make_cases("any", ny) if not c.embedded]
    assert [c.R for c in separate] == [2.0, 3.0, 4.0]
    for case in separate:
        lines = np.flatnonzero(case.mask)
        r = int(case.R)
        # a pure equispaced image mask: every R-th line, no fully sampled centre block
        assert np.all(np.diff(lines) == r)
        assert case.mask[ny // 2] == 1 and lines[0] < r
        if r > 1:
            assert not np.any(case.mask[1:] * case.mask[:-1])
        # 24 contiguous reference lines about the centre
        ref = np.flatnonzero(case.reference_lines)
        assert len(ref) == SEPARATE_REFERENCE_LINES
        assert np.all(np.diff(ref) == 1)
        assert ref[0] == ny // 2 - SEPARATE_REFERENCE_LINES // 2


def test_cases_are_deterministic():
    a, b = make_cases("phantom", 256), make_cases("phantom", 256)
    for x, y in zip(a, b):
        assert x.name == y.name and np.array_equal(x.mask, y.mask)
        assert np.array_equal(x.reference_lines, y.reference_lines)
    other = make_cases("phantom", 256, seed=1)
    random_a = [c for c in a if c.kind == "random"]
    random_o = [c for c in other if c.kind == "random"]
    assert any(not np.array_equal(x.mask, y.mask) for x, y in zip(random_a, random_o))
    # different datasets get different random draws
    brain = {c.name: c for c in make_cases("other", 256)}
    assert not np.array_equal(brain["random_R4_embedded"].mask, {c.name: c for c in a}["random_R4_embedded"].mask)
    assert [c.name for c in make_cases("x", 128, quick=True)] == list(eval_data.QUICK_CASES)


def test_undersample_never_leaks_reference_lines():
    rng = np.random.default_rng(0)
    kspace = (rng.standard_normal((3, 64, 20)) + 1j * rng.standard_normal((3, 64, 20))).astype(np.complex64)
    for case in make_cases("any", 64):
        image, calibration = undersample(case, kspace)
        sampled = case.mask > 0
        assert np.array_equal(sampled_lines(image), sampled)
        assert np.array_equal(image[:, sampled], kspace[:, sampled])
        assert np.array_equal(sampled_lines(calibration), case.reference_lines)
        assert np.array_equal(calibration[:, case.reference_lines], kspace[:, case.reference_lines])
        if not case.embedded:
            only_reference = case.reference_lines & ~sampled
            assert only_reference.sum() >= SEPARATE_REFERENCE_LINES - SEPARATE_REFERENCE_LINES // int(case.R) - 1
            assert np.all(image[:, only_reference] == 0)
    with pytest.raises(ValueError):
        undersample(make_cases("any", 32)[0], kspace)


# ----------------------------------------------------------------------------- harness
def test_harness_passes_methods_what_a_scanner_sends(tmp_path):
    from tools.evaluation.harness import ZERO_FILLED, run_evaluation
    dataset = synthetic_dataset()
    seen = []

    def spy(image_kspace, mask, calibration_kspace):
        seen.append((sampled_lines(image_kspace), mask.copy(), sampled_lines(calibration_kspace)))
        _, ifftc = _fft()
        return np.sqrt(np.sum(np.abs(ifftc(image_kspace, axes=(-2, -1))) ** 2, axis=0))

    summary = run_evaluation([dataset], {"spy": spy}, tmp_path, use_bart=False, quick=True, log=lambda *a, **k: None)
    assert len(seen) == len(eval_data.QUICK_CASES) == len(summary["rows"])
    for (image_lines, mask, calibration_lines), row in zip(seen, summary["rows"]):
        assert np.array_equal(image_lines, mask > 0)
        if row["layout"] == "separate":
            assert (calibration_lines & ~image_lines).any()
        # the spy is a zero-filled recon: same numbers as the built-in one
        assert row["metrics"]["spy"]["psnr"] == pytest.approx(row["metrics"][ZERO_FILLED]["psnr"], abs=1e-6)
        assert set(row["metrics"]["spy"]) == {"psnr", "ssim", "nmse", "psnr_fg", "ssim_fg"}
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["rows"][0]["metrics"]["spy"]["psnr"] == pytest.approx(summary["rows"][0]["metrics"]["spy"]["psnr"])
    table = (tmp_path / "results.md").read_text()
    assert "| synthetic | equispaced_R4_embedded |" in table and "spy PSNR / SSIM" in table
    assert (tmp_path / "figure_synthetic.png").is_file()


# ----------------------------------------------------------------------------- BART
def test_tuned_bart_sense_beats_zero_filled(tmp_path):
    from tools.evaluation.bart import bart_anchors, bart_available
    from tools.evaluation.harness import zero_filled
    from tools.evaluation.metrics import psnr, scale_match
    if not bart_available():
        pytest.skip("bart not installed")
    dataset = synthetic_dataset()
    case = next(c for c in make_cases("synthetic", 48) if c.name == "equispaced_R2_separate")
    image, calibration = undersample(case, dataset.kspace)
    anchors = bart_anchors(image, calibration, dataset.reference, cache_dir=tmp_path, regularisers=("l2",))
    sense = anchors["bart_sense_l2"]
    zf = zero_filled(image, case.mask, calibration)
    zf_psnr = psnr(dataset.reference, scale_match(zf, dataset.reference))
    assert sense.psnr > zf_psnr + 10, (sense.psnr, zf_psnr)
    assert sense.settings["regulariser"] == "l2" and sense.settings["maps"] in (1, 2)
    assert sense.settings["calib_region"] == f"{SEPARATE_REFERENCE_LINES}:48"
    assert len(sense.trials) >= 10 and sense.seconds > 0
    # a second run reads every result back from the cache
    again = bart_anchors(image, calibration, dataset.reference, cache_dir=tmp_path, regularisers=("l2",))
    assert all(t["cached"] for t in again["bart_sense_l2"].trials)
    assert again["bart_sense_l2"].psnr == pytest.approx(sense.psnr)


def test_bart_lambdas_live_on_a_quarter_decade_grid():
    from tools.evaluation.bart import LAMBDAS_COARSE, LAMBDA_RANGE, _canonical
    assert _canonical(1e-3 / 10 ** 0.5 / 10 ** 0.5) == _canonical(1e-4) == 1e-4
    assert _canonical(3e-2) == 0.0316 and _canonical(1e-3 * 10 ** 0.25) == 0.00178
    for reg, grid in LAMBDAS_COARSE.items():
        assert all(_canonical(lam) == lam for lam in grid + LAMBDA_RANGE[reg])


def test_cfl_round_trip(tmp_path):
    from tools.rawdata.cfl import read_cfl, write_cfl
    array = (np.arange(24).reshape(2, 3, 4) + 1j).astype(np.complex64)
    write_cfl(tmp_path / "x", array)
    assert np.array_equal(read_cfl(tmp_path / "x"), array)


# ----------------------------------------------------------------------------- real data
@pytest.mark.parametrize("name, shape", [("phantom", (8, 256, 256)), ("brain16", (16, 96, 96)),
                                         ("cimax", (16, 128, 128)), ("brain16_4ch", (4, 96, 96)),
                                         ("phantom_4ch", (4, 256, 256))])
def test_dataset_loaders(name, shape):
    filename = eval_data.DATASETS[name][0]
    if not (SHARED_DATA / filename).is_file():
        pytest.skip("../shared/data is absent")
    if name == "cimax":
        pytest.importorskip("twixtools")
    (dataset,) = eval_data.load_datasets(SHARED_DATA, [name], log=lambda *a: None)
    assert dataset.name == name and dataset.kspace.shape == shape and dataset.kspace.dtype == np.complex64
    _, ifftc = _fft()
    rss = np.sqrt(np.sum(np.abs(ifftc(dataset.kspace, axes=(-2, -1))) ** 2, axis=0))
    np.testing.assert_allclose(dataset.reference, rss, rtol=1e-4, atol=1e-6)
    assert dataset.reference.max() == pytest.approx(1.0)
    # k-space centred (the DC peak within a few samples of ny/2, nx/2)
    energy = np.sum(np.abs(dataset.kspace) ** 2, axis=0)
    peak = np.unravel_index(np.argmax(energy), energy.shape)
    assert abs(peak[0] - shape[1] // 2) <= 3 and abs(peak[1] - shape[2] // 2) <= 3
    # an object in the middle, background at the corners
    ref = dataset.reference
    assert ref[shape[1] // 2 - 4:shape[1] // 2 + 4, shape[2] // 2 - 4:shape[2] // 2 + 4].mean() > 5 * ref[:6, :6].mean()


def test_few_coil_dataset_is_a_unitary_compression_with_the_parents_low_r_cases():
    parent = synthetic_dataset(n=64, coils=8)
    few = eval_data.compressed_dataset(parent, 4)
    assert few.name == "synthetic_4ch" and few.shape == (4, 64, 64) and few.kspace.dtype == np.complex64
    # each virtual channel is a combination of the parent's: the compressed data (up to the common
    # scale) is the projection of the parent's onto their 4-dimensional span, the largest one
    flat, compressed = parent.kspace.reshape(8, -1), few.kspace.reshape(4, -1)
    basis, _ = np.linalg.qr(compressed.T.conj())
    projected = flat @ basis @ basis.T.conj()
    u, singular, _ = np.linalg.svd(flat, full_matrices=False)
    captured = np.linalg.norm(projected) ** 2 / np.linalg.norm(flat) ** 2
    assert captured == pytest.approx(np.sum(singular[:4] ** 2) / np.sum(singular ** 2), rel=1e-4)
    # its own RSS reference, max 1
    np.testing.assert_allclose(few.reference, reference_from_kspace(few.kspace), rtol=1e-6)
    assert few.reference.max() == pytest.approx(1.0)
    cases = eval_data.dataset_cases(few)
    parents = {c.name: c for c in eval_data.dataset_cases(parent)}
    assert [c.name for c in cases] == ["equispaced_R3_embedded", "random_R3_embedded", "equispaced_R4_embedded",
                                       "random_R4_embedded", "equispaced_R2_separate", "equispaced_R3_separate",
                                       "equispaced_R4_separate"]
    for case in cases:
        assert case.dataset == "synthetic_4ch"
        assert np.array_equal(case.mask, parents[case.name].mask)
        image, calibration = undersample(case, few.kspace)
        assert image.shape == (4, 64, 64) and np.array_equal(sampled_lines(calibration), case.reference_lines)
    assert len(eval_data.dataset_cases(parent)) == 13


def test_model_spec_carries_run_time_options():
    from tools.evaluation.harness import model_spec
    assert model_spec("models/pisf_v3.onnx") == ("models/pisf_v3.onnx", {}, "pisf_v3")
    path, options, name = model_spec("models/pisf_v3.onnx:block_cg=8,reflect_average=yes,virtual_coils=12")
    assert path == "models/pisf_v3.onnx" and name == "pisf_v3:block_cg=8,reflect_average=yes,virtual_coils=12"
    assert options == {"reflect_average": True, "virtual_coils": 12, "unrolled": {"block_cg": 8}}
    for bad in ("m.onnx:blocks_cg=8", "m.onnx:block_cg=eight", "m.onnx:reflect_average=maybe", "m.onnx:block_cg="):
        with pytest.raises(ValueError, match="model option"):
            model_spec(bad)


def test_missing_dataset_is_skipped_with_a_reason(tmp_path):
    messages = []
    assert eval_data.load_datasets(tmp_path, log=messages.append) == []
    assert len(messages) == 3 and all("not found" in m for m in messages)
    with pytest.raises(ValueError):
        eval_data.load_datasets(tmp_path, ["nope"])


def zero_filled_factory():
    """A --method factory for the CLI test."""
    from tools.evaluation.harness import zero_filled
    return zero_filled


def test_pisf_evaluate_cli_quick(tmp_path):
    from tools.cli import main
    if not (SHARED_DATA / eval_data.DATASETS["brain16"][0]).is_file():
        pytest.skip("../shared/data is absent")
    out = tmp_path / "eval"
    assert main(["evaluate", "--datasets", "brain16", "--quick", "--no-bart", "--out", str(out),
                 "--data", str(SHARED_DATA), "--method", "zf_again=test_eval_harness:zero_filled_factory"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [r["case"] for r in summary["rows"]] == list(eval_data.QUICK_CASES)
    for row in summary["rows"]:
        assert set(row["metrics"]) == {"zero_filled", "pisf_v3", "zf_again"}
        assert row["metrics"]["zf_again"]["psnr"] == pytest.approx(row["metrics"]["zero_filled"]["psnr"])
    assert (out / "figure_brain16.png").is_file() and "pisf_v3 PSNR / SSIM" in (out / "results.md").read_text()


def test_pisf_evaluate_cli_four_channel_set_with_model_options(tmp_path):
    from tools.cli import main
    model = Path(__file__).resolve().parents[1] / "models" / "pisf_v3.onnx"
    if not (SHARED_DATA / eval_data.DATASETS["brain16_4ch"][0]).is_file() or not model.is_file():
        pytest.skip("../shared/data or models/pisf_v3.onnx is absent")
    out = tmp_path / "eval"
    assert main(["evaluate", "--datasets", "brain16_4ch", "--quick", "--no-bart", "--out", str(out),
                 "--data", str(SHARED_DATA), "--model", str(model), f"{model}:block_cg=0"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["models"]["pisf_v3:block_cg=0"]["options"] == {"unrolled": {"block_cg": 0}}
    for row in summary["rows"]:
        assert row["dataset"] == "brain16_4ch" and row["coils"] == 4
        # without data consistency the image is the regulariser's alone: it must differ
        default, bare = row["metrics"]["pisf_v3"]["psnr"], row["metrics"]["pisf_v3:block_cg=0"]["psnr"]
        assert abs(default - bare) > 0.01
    assert main(["evaluate", "--datasets", "brain16_4ch", "--quick", "--no-bart", "--out", str(out),
                 "--data", str(SHARED_DATA), "--model", f"{model}:block_cg=-2"]) == 1


def test_classical_table_is_a_pisf_subcommand(tmp_path, capsys):
    from tools.cli import SUBCOMMANDS, main
    from tools.evaluation.classical_table import table

    assert SUBCOMMANDS["classical-table"][0] == "tools.evaluation.classical_table"
    assert main(["classical-table", str(tmp_path / "no_run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"pisf classical-table: error: {tmp_path / 'no_run' / 'results.json'}: no such file or "
                   f"directory; check the path")

    def m(psnr):
        return {"psnr": psnr, "ssim": 0.5}

    row = {"dataset": "phantom", "case": "equispaced_R4_embedded", "R_achieved": 3.9,
           "metrics": {"zero_filled": m(20.0), "bart_sense_l2": m(30.0), "sense": m(29.0), "grappa": m(31.0)},
           "seconds": {"bart_sense_l2": 2.0, "sense": 1.0, "grappa": 0.5}}
    text = table({"rows": [row]}, {("phantom", "equispaced_R4_embedded"): {"metrics": m(28.0), "seconds": 1.5}})
    line = next(l for l in text.splitlines() if l.startswith("| phantom"))
    assert "| 29.00 / 0.500 | -1.00 | +1.00 |" in line              # sense vs BART tuned, vs fixed
    assert "sense time / BART l2 tuned (ecalib + pics) time: median 0.50" in text
