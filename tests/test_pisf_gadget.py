"""The PISF gadget in the server: shared warmed-up sessions, provider fallback, I/O binding, quality."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets import pisf as pisf_gadget
from gadgets.context import StreamContext
from gadgets.numerics.pisf_inference import PisfReconstructor
from gadgets.wire.client import replay
from tools.evaluation.metrics import psnr, scale_match
from tools.rawdata.simulate import simulate

SHIPPED = pisf_gadget.MODELS_DIR / "pisf_fast.onnx"
pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="models/pisf_fast.onnx not shipped")


def test_io_binding_gives_the_same_rows_as_a_plain_run():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 16, 96)).astype(np.float32) * 0.1
    masks = np.zeros((40, 1, 96), np.float32)
    masks[:, :, ::3] = 1
    masks[:, :, 40:56] = 1
    rows *= masks
    plain = PisfReconstructor(SHIPPED, threads=1).run_rows(rows, masks)
    bound = PisfReconstructor(SHIPPED, threads=1, io_binding=True).run_rows(rows, masks)
    np.testing.assert_array_equal(bound, plain)


def test_sessions_are_shared_and_missing_providers_fall_back_to_cpu(tmp_path):
    path = tmp_path / "h.h5"
    simulated = simulate(path, matrix=32, coils=2, accel=2, acs=8)
    header = __import__("ismrmrd").xsd.CreateFromDocument(simulated["header_xml"])
    wanted = ["NoSuchExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    first = pisf_gadget.PisfRecon(StreamContext(header), providers=wanted, threads=1)
    second = pisf_gadget.PisfRecon(StreamContext(header), providers=wanted, threads=1)
    assert first.reconstructor is second.reconstructor  # one session per process and settings
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in __import__(
        "onnxruntime").get_available_providers() else "CPUExecutionProvider"
    assert first.provider == expected


def test_pisf_chain_beats_zero_filled_through_the_server(server, tmp_path):
    path = tmp_path / "scan.h5"
    truth = simulate(path, matrix=128, coils=8, accel=4, acs=16, slices=3, noise=0.01, seed=11)["rss"]
    results = {chain: replay(path, *server.address, config=chain) for chain in ("zerofill", "pisf")}
    scores = {}
    for chain, result in results.items():
        assert result.closed and result.error is None and not result.errors, (chain, result.texts)
        assert len(result.images) == 3
        scores[chain] = np.mean([psnr(truth[r.image.slice, 0], scale_match(r.image.data[0, 0].astype(float),
                                                                          truth[r.image.slice, 0]))
                                 for r in result.images])
    image = results["pisf"].images[0].image
    assert image.meta["PISF_Provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert image.image_series_index == 2 and image.meta["ImageComment"].startswith("PISF sense_v3 (pisf_v3.onnx)")
    assert scores["pisf"] > scores["zerofill"] + 5.0, scores


@pytest.mark.parametrize("model", ["pisf_fast.onnx", "pisf_sense.onnx"])
def test_the_core_hands_back_what_the_quality_signals_need(model, monkeypatch):
    """reconstruct_slice compresses once and returns the image with the data and model its
    residual needs; they equal what the separate calls compute (contract 1: the virtual-coil
    images and compressed data; contract 2: the calibrated compression and maps)."""
    from gadgets.numerics import pisf_inference
    from gadgets.numerics.coils import compress
    from gadgets.numerics.quality import coil_residual, sense_residual
    from tests.test_calibration import centre_lines, synthetic_scan
    path = pisf_gadget.MODELS_DIR / model
    if not path.is_file():
        pytest.skip(f"models/{model} not shipped")
    recon = PisfReconstructor(path, threads=1)
    kspace, _, _ = synthetic_scan(64, coils=10)
    lines = centre_lines(64, 12)
    mask = np.zeros(64, np.float32)
    mask[::3] = 1
    data, reference = kspace * mask[None, :, None], kspace * lines[None, :, None]
    fits = []
    original = pisf_inference.coil_compression_matrix
    monkeypatch.setattr(pisf_inference, "coil_compression_matrix", lambda *a: fits.append(1) or original(*a))
    result = recon.reconstruct_slice(data, mask, reference, lines)
    monkeypatch.setattr(pisf_inference, "coil_compression_matrix", original)
    np.testing.assert_array_equal(result.magnitude, recon.reconstruct(data, mask, reference, lines))
    if recon.contract == "1":
        assert len(fits) == 1
        samples = reference[:, lines]
        np.testing.assert_array_equal(result.coil_images, recon.reconstruct_coils(data, mask, samples))
        np.testing.assert_array_equal(result.measured, recon.preprocess(data, mask, samples)[2])
        expected = coil_residual(result.coil_images, result.measured, mask)
    else:
        matrix, maps = recon.calibrate(data, mask, reference, lines)
        np.testing.assert_array_equal(result.compression, matrix)
        np.testing.assert_array_equal(result.maps, maps)
        expected = sense_residual(result.image, maps, compress(data * mask[None, :, None], matrix), mask)
    assert result.data_consistency() == pytest.approx(expected, rel=1e-6)
    assert 0 < result.data_consistency() < 0.5


def test_the_pisf_stage_fits_the_coil_compression_once_per_slice(tmp_path, monkeypatch):
    """Contract 1 through the stage: one compression fit per slice (the stage used to fit it a
    second time for its residual), and the meta's residual is the core's."""
    from gadgets.numerics import pisf_inference
    from tests.test_calibration import centre_lines, synthetic_scan
    from tests.test_classical import slice_item
    simulated = simulate(tmp_path / "h.h5", matrix=32, coils=2, accel=2, acs=8)
    header = __import__("ismrmrd").xsd.CreateFromDocument(simulated["header_xml"])
    stage = pisf_gadget.PisfRecon(StreamContext(header), model="pisf_fast.onnx", threads=1)
    kspace, _, _ = synthetic_scan(64, coils=8)
    lines = centre_lines(64, 12)
    mask = np.zeros(64, np.float32)
    mask[::3] = 1
    mask[lines] = 1
    fits = []
    original = pisf_inference.coil_compression_matrix
    monkeypatch.setattr(pisf_inference, "coil_compression_matrix", lambda *a: fits.append(1) or original(*a))
    [image] = [o for o in stage([slice_item(kspace, mask, lines)]) if hasattr(o, "meta")]
    assert len(fits) == 1 and image.meta["PISF_Method"] == "PISF"
    result = stage.reconstructor.reconstruct_slice(kspace * mask[None, :, None], mask,
                                                   kspace * lines[None, :, None], lines)
    assert image.meta["PISF_DataConsistency"] == f"{result.data_consistency():.4f}"
    np.testing.assert_array_equal(image.data[0], result.magnitude)
