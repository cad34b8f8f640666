"""PISF v2 (scan-calibrated): normal system, CG, synthesis with calibration, export, contract."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from gadgets.numerics.fft import fftc, ifftc  # noqa: E402
from gadgets.numerics.pisf_inference import ModelContractError, PisfReconstructor  # noqa: E402
from models.pisf_sense import SenseNetConfig, build, conjugate_gradient, mean_diagonal, normal_system  # noqa: E402
from tools.training import synth  # noqa: E402
from tools.training.export import Signature, export_model, parity  # noqa: E402


def as_rows(array: np.ndarray) -> torch.Tensor:
    """complex [rows, C, ny] -> [rows, 2C, ny] float64 (real parts, then imaginary)."""
    return torch.tensor(np.concatenate([array.real, array.imag], axis=1), dtype=torch.float64)


@pytest.mark.parametrize("ny", [8, 9, 40])
def test_normal_system_equals_the_explicit_sense_operator(ny):
    rng = np.random.default_rng(ny)
    rows, coils = 3, 4
    sens = rng.normal(size=(rows, coils, ny)) + 1j * rng.normal(size=(rows, coils, ny))
    image = rng.normal(size=(rows, ny)) + 1j * rng.normal(size=(rows, ny))
    mask = (rng.uniform(size=(rows, ny)) < 0.5).astype(float)
    measured = fftc(sens * image[:, None], axes=(-1,)) * mask[:, None]
    dft = fftc(np.eye(ny), axes=(0,))
    explicit = np.stack([sum(np.diag(sens[r, c].conj()) @ dft.conj().T @ np.diag(mask[r]) @ dft @ np.diag(sens[r, c])
                             for c in range(coils)) for r in range(rows)])
    rhs = np.sum(sens.conj() * ifftc(measured, axes=(-1,)), axis=1)
    (n_re, n_im), (b_re, b_im) = normal_system(as_rows(measured), torch.tensor(mask[:, None]), as_rows(sens))
    assert np.abs(n_re.numpy() + 1j * n_im.numpy() - explicit).max() < 1e-10
    assert np.abs(b_re.numpy() + 1j * b_im.numpy() - rhs).max() < 1e-10
    # CG on a well-conditioned system reaches the direct solution
    x_re, x_im = conjugate_gradient((n_re, n_im), b_re, b_im, 0 * b_re, 0 * b_im, 1.0, 3 * ny)
    direct = np.linalg.solve(explicit + np.eye(ny), rhs[..., None])[..., 0]
    assert np.abs(x_re.numpy() + 1j * x_im.numpy() - direct).max() < 1e-6 * np.abs(direct).max()


def test_untrained_network_is_proximal_sense_for_any_coil_count():
    """Zero-initialised regularisers propose their input unchanged, so the untrained network is
    Tikhonov SENSE followed by proximal steps x <- (N + mu I)^-1 (b + mu x) (lambda and mu
    relative to each row's mean diag(N)): checked against direct solves, for several coil
    counts (the graph takes any)."""
    ny = 12
    model = build(SenseNetConfig(blocks=2, features=8, res_units=1, init_cg=4 * ny, block_cg=4 * ny)).double().eval()
    gen = torch.Generator().manual_seed(0)
    for coils in (3, 8, 12):
        sig = Signature(model)
        sig.coils = coils
        kspace, mask, sens = (t.double() for t in sig.example(5, ny, gen))
        with torch.no_grad():
            outputs = model(kspace, mask, sens, return_all=True)
            (n_re, n_im), (b_re, b_im) = normal_system(kspace, mask, sens)
            scale = mean_diagonal(mask, sens).numpy()[:, :, None]              # [rows, 1, 1]
            lam = float(torch.nn.functional.softplus(model.init_lambda)) * scale
            mus = [mu * scale for mu in torch.nn.functional.softplus(model.block_mu).tolist()]
        normal = n_re.numpy() + 1j * n_im.numpy()
        rhs = b_re.numpy() + 1j * b_im.numpy()
        identity = np.eye(ny)
        expected = np.linalg.solve(normal + lam * identity, rhs[..., None])[..., 0]
        for k, output in enumerate(outputs):
            got = output[:, 0].numpy() + 1j * output[:, 1].numpy()
            assert output.shape == (5, 2, ny)
            assert np.abs(got - expected).max() < 1e-6 * np.abs(expected).max()
            if k < len(mus):
                expected = np.linalg.solve(normal + mus[k] * identity,
                                           (rhs + mus[k][:, 0] * expected)[..., None])[..., 0]


def test_sense_batch_carries_maps_and_separate_reference_masks():
    torch.set_num_threads(1)
    synthesizer = synth.Synthesizer(synth.SynthConfig(pixels_per_batch=2048, ny_range=(64, 96)), seed=4)
    batch = synth.sense_batch(synthesizer, separate_reference_prob=1.0)
    channels = batch["inputs"].shape[1]
    assert batch["sens"].shape == batch["inputs"].shape and channels in (16, 24, 32)
    coils = channels // 2
    sens = batch["sens"][:, :coils] ** 2 + batch["sens"][:, coils:] ** 2
    assert torch.allclose(sens.sum(1), torch.ones_like(sens.sum(1)), atol=1e-4)      # unit RSS maps
    masks = batch["mask"][:, 0]
    for row in masks:              # pure equispaced: constant spacing, no centre block
        lines = torch.nonzero(row).flatten()
        assert len(set(torch.diff(lines).tolist())) == 1
    # the target is consistent with the data: on sampled lines the clean target through the maps
    # is close to the measured data (noise and map error only)
    assert batch["target"].shape == (batch["inputs"].shape[0], 2, batch["inputs"].shape[2])


def _trained_looking(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
    return model.eval()


def test_export_parity_and_runtime_contract(tmp_path):
    model = _trained_looking(build(SenseNetConfig(blocks=2, features=8, res_units=1)))
    path = export_model(model, tmp_path / "v2.onnx", {"contract": "2", "coils": 8, "pisf_variant": "test"})
    check = parity(model, path)
    assert check["max_rel_error"] < 1e-4
    recon = PisfReconstructor(path, threads=1)
    assert recon.contract == "2" and recon.input_names == ("kspace", "mask", "sens")
    # a contract-1 graph labelled as contract 2 is refused with a message naming both
    from models.pisf_net import PisfConfig, PisfNet
    wrong = export_model(PisfNet(PisfConfig(blocks=1, features=4, res_units=1)).eval(), tmp_path / "wrong.onnx",
                         {"contract": "2", "coils": 8})
    with pytest.raises(ModelContractError, match="claims contract 2 but has inputs"):
        PisfReconstructor(wrong, threads=1)
    unknown = export_model(model, tmp_path / "future.onnx", {"contract": "7"})
    with pytest.raises(ModelContractError, match="follows ONNX contract 7"):
        PisfReconstructor(unknown, threads=1)


def test_runtime_v2_path_reconstructs_a_slice_from_separate_reference(tmp_path):
    """The numpy half of contract 2 (compression, ESPIRiT, normalisation) around an untrained
    model (= SENSE) unfolds R=2 equispaced data whose reference lines are not image data."""
    from tests.test_calibration import centre_lines, synthetic_scan
    model = build(SenseNetConfig(blocks=1, features=4, res_units=1, init_cg=40, init_lambda=1e-3))
    path = export_model(model.eval(), tmp_path / "v2.onnx", {"contract": "2", "coils": 8})
    recon = PisfReconstructor(path, threads=1)
    kspace, image, _ = synthetic_scan(64, coils=8)
    lines = centre_lines(64, 20)
    mask = np.zeros(64, np.float32)
    mask[::2] = 1
    result = recon.reconstruct(kspace * mask[None, :, None], mask, kspace * lines[None, :, None], lines)
    reference = np.sqrt(np.sum(np.abs(ifftc(kspace, axes=(1, 2))) ** 2, axis=0))
    zero_filled = np.sqrt(np.sum(np.abs(ifftc(kspace * mask[None, :, None], axes=(1, 2))) ** 2, axis=0))

    def error(x):
        x = x * np.vdot(x, reference).real / np.vdot(x, x).real
        return np.linalg.norm(x - reference) / np.linalg.norm(reference)

    assert error(result) < 0.05
    assert error(zero_filled) > 5 * error(result)
    with pytest.raises(ValueError, match="needs at least"):
        recon.reconstruct(kspace * mask[None, :, None], mask, kspace * centre_lines(64, 3)[None, :, None],
                          centre_lines(64, 3))
