"""PISF v3: FFT data consistency (torch and numpy) equals v2's dense normal matrices, and the
exported regulariser bank + numpy runtime equals the torch network (contract 3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from gadgets.numerics.pisf_unrolled import UnrolledPisf, compress_rows, conjugate_gradient, multi_shift_cg  # noqa: E402
from gadgets.numerics.sense_rows import RowSense  # noqa: E402
from models import pisf_v3  # noqa: E402
from models.pisf_sense import DenseNormal, FftNormal, SenseNetConfig, build  # noqa: E402
from tests.test_pisf_sense import _trained_looking  # noqa: E402  (the same random-but-nonzero weights)

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "training" / "pisf_sense_last.pt"


def random_rows(rows: int, ny: int, coils: int, seed: int, dtype=torch.float64):
    kspace, mask, sens = pisf_v3.example_rows(rows, ny, torch.Generator().manual_seed(seed), coils, scale=1.0)
    return kspace.to(dtype), mask.to(dtype), sens.to(dtype)


def complex_rows(pair_rows: torch.Tensor) -> np.ndarray:
    return pisf_v3.as_complex(pair_rows.float())


@pytest.mark.parametrize("ny", [8, 9, 40, 63])
def test_fft_normal_operator_equals_dense_normal_matrices(ny):
    kspace, mask, sens = random_rows(3, ny, 4, ny)
    fft, dense = FftNormal(kspace, mask, sens), DenseNormal(kspace, mask, sens)
    x_re, x_im = torch.randn(3, ny, dtype=torch.float64), torch.randn(3, ny, dtype=torch.float64)
    shift = torch.rand(3, 1, dtype=torch.float64)
    for got, expected in zip(fft.apply(x_re, x_im, shift) + fft.rhs, dense.apply(x_re, x_im, shift) + dense.rhs):
        assert torch.abs(got - expected).max() < 1e-12 * torch.abs(expected).max()


@pytest.mark.parametrize("ny", [16, 33])
def test_numpy_row_operator_equals_torch_operator(ny):
    kspace, mask, sens = random_rows(5, ny, 6, 100 + ny)
    torch_operator = FftNormal(kspace, mask, sens)
    operator = RowSense(complex_rows(sens), mask[:, 0].numpy())
    x = (np.random.default_rng(ny).normal(size=(5, ny, 2)) @ [1, 1j]).astype(np.complex64)
    expected = torch_operator.apply(torch.tensor(x.real, dtype=torch.float64), torch.tensor(x.imag, dtype=torch.float64), 0.0)
    expected_rhs = torch_operator.rhs
    got, rhs = operator.normal(x), operator.adjoint(complex_rows(kspace))
    for value, (re, im) in ((got, expected), (rhs, expected_rhs)):
        reference = re.numpy() + 1j * im.numpy()
        assert np.abs(value - reference).max() < 1e-5 * np.abs(reference).max()
    # the scale of lambda and mu, as the torch network computes it
    from models.pisf_sense import mean_diagonal
    assert np.allclose(operator.mean_diagonal(), mean_diagonal(mask, sens).numpy(), rtol=1e-5)


def test_per_row_coil_rotation_leaves_the_normal_system_unchanged():
    kspace, mask, sens = random_rows(4, 40, 8, 11)
    data, maps = complex_rows(kspace), complex_rows(sens)
    rotated_data, rotated_maps = compress_rows(data, maps, 8)
    original, rotated = RowSense(maps, mask[:, 0].numpy()), RowSense(rotated_maps, mask[:, 0].numpy())
    x = (np.random.default_rng(1).normal(size=(4, 40, 2)) @ [1, 1j]).astype(np.complex64)
    assert np.abs(rotated.normal(x) - original.normal(x)).max() < 1e-5 * np.abs(original.normal(x)).max()
    assert np.abs(rotated.adjoint(rotated_data) - original.adjoint(data)).max() < 1e-5 * np.abs(original.adjoint(data)).max()
    assert compress_rows(data, maps, 5)[1].shape == (4, 5, 40)


def test_multi_shift_cg_equals_two_separate_cg_runs():
    kspace, mask, sens = random_rows(6, 48, 8, 7)
    operator = RowSense(complex_rows(sens), mask[:, 0].numpy())
    rhs = operator.adjoint(complex_rows(kspace))
    scale = operator.mean_diagonal()
    shifts = (np.float32(0.003) * scale, np.float32(0.09) * scale)
    together = multi_shift_cg(operator, shifts, rhs, 8)
    for shift, solved in zip(shifts, together):
        separate = conjugate_gradient(operator, shift, rhs, None, 8)
        assert np.abs(solved - separate).max() < 1e-5 * np.abs(separate).max()


def test_fft_forward_equals_dense_forward_of_a_network():
    model = build(SenseNetConfig(blocks=2, features=8, res_units=1)).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):      # trained-looking weights, not identity blocks
                module.weight.copy_(torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        inputs = random_rows(4, 37, 8, 3)
        model.normal_form = "dense"
        dense = model(*inputs, return_all=True)
        model.normal_form = "fft"
        fft = model(*inputs, return_all=True)
    for a, b in zip(dense, fft):
        assert torch.abs(a - b).max() < 1e-10 * torch.abs(a).max()


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="shipped v2 checkpoint absent")
def test_exported_bank_and_numpy_runtime_equal_the_torch_network(tmp_path):
    from tools.training.export import load_checkpoint
    torch.set_num_threads(1)
    model, _ = load_checkpoint(CHECKPOINT)
    path = pisf_v3.export_bank(model, tmp_path / "v3.onnx", {"contract": "3", **pisf_v3.runtime_metadata(model)})
    check = pisf_v3.parity(model, path, cases=((5, 64), (3, 97)))
    assert check["max_rel_error"] < 1e-5
    # each block of the bank equals the torch block (BatchNorm folded, 2D-conv form)
    image, initial = pisf_v3.example_inputs(3, 50, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for folded, block in zip(pisf_v3.folded_blocks(model), model.blocks):
            expected = block(image, initial)
            assert torch.abs(folded(image, initial) - expected).max() < 1e-5 * torch.abs(expected).max()


def test_runtime_refuses_incomplete_metadata():
    with pytest.raises(ValueError, match="lacks metadata"):
        UnrolledPisf(session=None, metadata={"contract": "3", "blocks": "2"})
    with pytest.raises(ValueError, match="2 blocks but 1 block_mu"):
        UnrolledPisf(session=None, metadata={"init_lambda": "0.1", "smooth_lambda": "0.2", "block_mu": "0.1",
                                             "blocks": "2", "init_cg": "2", "block_cg": "2"})


def _small_trained_looking_network():
    return _trained_looking(build(SenseNetConfig(blocks=2, features=8, res_units=1)))


def test_contract_3_slice_equals_contract_2_slice_and_wrong_banks_are_refused(tmp_path):
    """The same network exported as contract 2 (dense graph) and as contract 3 (bank + numpy data
    consistency) gives the same image of a slice through PisfReconstructor (calibration included);
    a graph claiming contract 3 with other inputs, or without the scalars, is refused."""
    from gadgets.numerics.pisf_inference import ModelContractError, PisfReconstructor
    from tests.test_calibration import centre_lines, synthetic_scan
    from tools.training.export import export_model
    model = _small_trained_looking_network()
    v2 = PisfReconstructor(export_model(model, tmp_path / "v2.onnx", {"contract": "2", "coils": 8}), threads=1)
    bank = pisf_v3.export_bank(model, tmp_path / "v3.onnx", {"contract": "3", "coils": 8,
                                                             **pisf_v3.runtime_metadata(model)})
    v3 = PisfReconstructor(bank, threads=1, max_rows_per_run=24)
    assert v3.contract == "3" and v3.scan_calibrated and v3.input_names == ("image", "initial", "block")
    kspace, _, _ = synthetic_scan(64, coils=8)
    mask = np.zeros(64, np.float32)
    mask[::3] = 1
    mask[centre_lines(64, 16)] = 1
    expected = v2.reconstruct_image(kspace * mask[None, :, None], mask)
    got = v3.reconstruct_image(kspace * mask[None, :, None], mask)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    wrong = export_model(model, tmp_path / "wrong.onnx", {"contract": "3", **pisf_v3.runtime_metadata(model)})
    with pytest.raises(ModelContractError, match="claims contract 3 but has inputs"):
        PisfReconstructor(wrong, threads=1)
    bare = pisf_v3.export_bank(model, tmp_path / "bare.onnx", {"contract": "3", "coils": 8})
    with pytest.raises(ModelContractError, match="metadata lacks"):
        PisfReconstructor(bare, threads=1)
