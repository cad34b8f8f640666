"""Contract 3's run-time options (init_cg, block_cg) on the shipped bank: the trained counts by
default, and more CG steps solve the data consistency more exactly. No torch needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from gadgets.numerics.pisf_inference import PisfReconstructor  # noqa: E402
from gadgets.numerics.pisf_unrolled import UnrolledPisf  # noqa: E402
from gadgets.numerics.sense_rows import RowSense  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
V3 = MODELS / "pisf_v3.onnx"
pytestmark = pytest.mark.skipif(not V3.is_file(), reason="models/pisf_v3.onnx absent")


class RecordingBank:
    """The bank's session, keeping the last proposal z it returned."""

    def __init__(self, session):
        self.session, self.last_proposal = session, None

    def run(self, outputs, feeds):
        result = self.session.run(outputs, feeds)
        self.last_proposal = (result[0][:, 0] + 1j * result[0][:, 1]).astype(np.complex64)
        return result


def slice_rows(recon: PisfReconstructor, n: int = 48):
    """(measured rows, mask, maps rows) of a synthetic R3 slice with a 16-line centre, as the
    runtime hands them to UnrolledPisf."""
    from tests.test_calibration import centre_lines, synthetic_scan
    kspace, _, _ = synthetic_scan(n, coils=8)
    mask = np.zeros(n, np.float32)
    mask[::3] = 1
    mask[centre_lines(n, 16)] = 1
    from gadgets.numerics.coils import compress, normalisation_scale
    from gadgets.numerics.fft import ifftc
    measured = kspace * mask[None, :, None]
    matrix, maps = recon.calibrate(measured, mask)
    data = compress(measured, matrix)
    hybrid = ifftc(data, axes=(-1,)) / normalisation_scale(data, mask)
    return (np.ascontiguousarray(hybrid.transpose(2, 0, 1), dtype=np.complex64), mask,
            np.ascontiguousarray(maps.transpose(2, 0, 1), dtype=np.complex64))


def last_block_residual(unrolled: UnrolledPisf, bank: RecordingBank, measured, mask, maps) -> float:
    """||(N + mu d) x - (b + mu d z)|| / ||b + mu d z|| of the last block's system at its output x."""
    image = unrolled.run(measured, mask, maps)
    operator = RowSense(maps, mask)
    shift = unrolled.mus[-1] * operator.mean_diagonal()
    rhs = operator.adjoint(measured) + shift * bank.last_proposal
    return float(np.linalg.norm(operator.normal(image) + shift * image - rhs) / np.linalg.norm(rhs))


def test_cg_counts_default_to_the_trained_ones_and_more_steps_solve_the_data_consistency_closer():
    recon = PisfReconstructor(V3, threads=1)
    metadata = recon.metadata
    assert (recon.unrolled.init_cg, recon.unrolled.block_cg) == (int(metadata["init_cg"]), int(metadata["block_cg"]))
    tuned = PisfReconstructor(V3, threads=1, unrolled={"block_cg": 9, "init_cg": 13})
    assert (tuned.unrolled.init_cg, tuned.unrolled.block_cg) == (13, 9)
    measured, mask, maps = slice_rows(recon)
    bank = RecordingBank(recon.session)
    residuals = {steps: last_block_residual(UnrolledPisf(bank, metadata, block_cg=steps), bank, measured, mask, maps)
                 for steps in (0, int(metadata["block_cg"]), 12)}
    assert residuals[12] < 0.5 * residuals[int(metadata["block_cg"])] < 0.5 * residuals[0], residuals
    # block_cg 0: no data consistency, the image is the last block's proposal
    image = UnrolledPisf(bank, metadata, block_cg=0).run(measured, mask, maps)
    assert np.array_equal(image, bank.last_proposal)


def test_more_start_iterations_bring_the_tikhonov_starts_closer_to_their_solutions():
    recon = PisfReconstructor(V3, threads=1)
    measured, mask, maps = slice_rows(recon)
    operator = RowSense(maps, mask)
    rhs, scale = operator.adjoint(measured), operator.mean_diagonal()

    def start_residual(steps):
        unrolled = UnrolledPisf(recon.session, recon.metadata, init_cg=steps)
        sharp = unrolled.starts(operator, rhs, scale)[0]
        shift = unrolled.lambdas[0] * scale
        return float(np.linalg.norm(operator.normal(sharp) + shift * sharp - rhs) / np.linalg.norm(rhs))

    assert start_residual(16) < 0.5 * start_residual(int(recon.metadata["init_cg"])) < 0.5 * start_residual(2)
    # the option reaches the image: different start counts give different images
    default = recon.unrolled.run(measured, mask, maps)
    other = UnrolledPisf(recon.session, recon.metadata, init_cg=16).run(measured, mask, maps)
    assert np.abs(other - default).max() > 1e-4 * np.abs(default).max()


def test_bad_options_are_refused_with_one_clear_error():
    recon = PisfReconstructor(V3, threads=1)
    with pytest.raises(ValueError, match="init_cg must be >= 1"):
        UnrolledPisf(recon.session, recon.metadata, init_cg=0)
    with pytest.raises(ValueError, match="block_cg and row_coils >= 0"):
        UnrolledPisf(recon.session, recon.metadata, block_cg=-1)
    with pytest.raises(TypeError):
        PisfReconstructor(V3, threads=1, unrolled={"block_steps": 3})
    contract_2 = MODELS / "pisf_sense.onnx"
    if contract_2.is_file():
        with pytest.raises(ValueError, match="apply to contract-3 models"):
            PisfReconstructor(contract_2, threads=1, unrolled={"block_cg": 8})


def test_bench_model_times_a_model_with_its_options():
    pytest.importorskip("skimage")
    from tools.bench.model import bench
    default, tuned = bench([str(V3), f"{V3}:block_cg=6,reflect_average=1"], [1], repeats=1, size=64)
    assert tuned["model"] == f"{V3}:block_cg=6,reflect_average=1" and tuned["contract"] == "3"
    trained = PisfReconstructor(V3, threads=1).metadata
    assert (default["block_cg"], default["reflect_average"]) == (int(trained["block_cg"]), False)
    assert (tuned["block_cg"], tuned["init_cg"], tuned["reflect_average"]) == (6, int(trained["init_cg"]), True)
    result = tuned
    assert result["network_median_s"] > 0 and result["reconstruct_median_s"] >= result["network_median_s"] * 0.5
