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
    assert image.image_series_index == 2 and image.meta["ImageComment"].startswith("PISF sense (pisf_sense.onnx)")
    assert scores["pisf"] > scores["zerofill"] + 5.0, scores
