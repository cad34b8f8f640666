"""PISF synthesis, network, training, export and inference core (fast, CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gadgets.numerics.coils import coil_compression_matrix, compress, normalisation_scale  # noqa: E402
from gadgets.numerics.fft import fftc, ifftc  # noqa: E402
from gadgets.numerics.pisf_inference import calibration_lines, zero_filled  # noqa: E402
from models.pisf_net import PisfConfig, PisfNet, macs_per_pixel, parameter_count  # noqa: E402
from tools.training import synth  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "models" / "pisf_fast.onnx"


@pytest.fixture(scope="module")
def synthesizer():
    torch.set_num_threads(1)
    cfg = synth.SynthConfig(pixels_per_batch=4096, rows_per_slice=16)
    return synth.Synthesizer(cfg, seed=3)


def _randomised(model: PisfNet, seed: int = 0) -> PisfNet:
    """Give the (zero-initialised) output convs and BN statistics non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.2)
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("kind", ["equispaced", "random", "variable_density"])
@pytest.mark.parametrize("accel,acs", [(2, 4), (4, 24), (6, 12), (10, 8)])
def test_mask_acceleration_and_acs(kind, accel, acs):
    gen = torch.Generator().manual_seed(accel * 100 + acs)
    ny = 256
    masks, info = synth.make_masks(6, ny, synth.SynthConfig(), gen, kind=kind, acceleration=accel,
                                   acs=acs, partial_fourier=False)
    for row in masks:
        assert abs(int(row.sum()) - round(ny / accel)) <= 1           # R counts the ACS lines
        centre = row[ny // 2 - acs // 2: ny // 2 - acs // 2 + acs]
        assert bool((centre == 1).all())
    calibration = synth.calibration_lines_torch(masks)
    for row, cal in zip(masks.numpy(), calibration.numpy()):
        assert cal.sum() >= acs
        assert np.array_equal(cal, calibration_lines(row))            # same rule as the runtime


def test_random_masks_cover_requested_ranges():
    gen = torch.Generator().manual_seed(0)
    cfg = synth.SynthConfig(partial_fourier_prob=0.0)
    masks, info = synth.make_masks(200, 320, cfg, gen)
    assert min(info["acceleration"]) >= 2 and max(info["acceleration"]) <= 10
    assert min(info["acs"]) >= 4 and max(info["acs"]) <= 32
    assert set(info["kind"]) == {"equispaced", "random", "variable_density"}
    measured = 320 / masks.sum(1)
    requested = torch.tensor(info["acceleration"])
    assert torch.allclose(measured, requested, rtol=0.05)


def test_coil_counts_and_compression(synthesizer):
    batch = synthesizer.batch(ny=64, slices=12)
    counts = batch["n_coils"]
    assert int(counts.min()) >= 4 and int(counts.max()) <= 32
    assert batch["inputs"].shape[1] == 2 * synthesizer.cfg.coils      # C = 8 virtual coils
    few = synthesizer.batch(ny=64, slices=2, n_coils=5)
    channels = few["inputs"].reshape(-1, 2, 8, 64)
    assert float(channels[:, :, 5:].abs().max()) == 0.0                 # zero-padded to C
    assert float(channels[:, :, :5].abs().max()) > 0.0


@pytest.mark.parametrize("snr", [10.0, 50.0])
def test_noise_level_matches_requested_snr(synthesizer, snr):
    batch = synthesizer.batch(ny=128, slices=8, snr=snr)
    noise = batch["noisy_hybrid"] - batch["clean_hybrid"]               # [B, coils, rows, ny]
    clean_images = synth.ifftc(batch["clean_hybrid"], -1)
    for b in range(noise.shape[0]):
        n = int(batch["n_coils"][b])
        noise_std = float(noise[b, :n].abs().pow(2).mean().sqrt())       # mean per-coil variance
        signal_rms = float(clean_images[b, :n].abs().pow(2).mean().sqrt())
        assert signal_rms / noise_std == pytest.approx(snr, rel=0.1)
        assert float(noise[b, n:].abs().sum()) == 0.0                    # padded coils: none


def test_rows_are_normalised_like_the_runtime(synthesizer):
    batch = synthesizer.batch(ny=96, slices=4, slab_max_jitter=False)
    rows = batch["inputs"]
    images = synth.ifftc(torch.complex(rows[:, :8], rows[:, 8:]), -1).abs()
    per_slice = images.reshape(4, -1).amax(1)
    assert torch.allclose(per_slice, torch.ones(4), atol=1e-5)          # slice max is 1
    assert float((images.amax(dim=(1, 2)) < 0.999).float().mean()) > 0.3  # most rows below 1


# ----------------------------------------------------------------------------- torch == numpy
@pytest.mark.parametrize("coils", [5, 8, 20])
def test_torch_preprocessing_equals_numpy_runtime(coils):
    gen_cfg = synth.SynthConfig(rows_per_slice=40, physical_coils=(coils, coils))
    s = synth.Synthesizer(gen_cfg, seed=coils)
    batch = s.batch(ny=72, slices=1, n_coils=coils, slab_max_jitter=False)
    noisy = batch["noisy_hybrid"][0, :coils]                               # [coils, x, ky]
    mask = batch["slice_mask"][0].numpy()
    # the runtime sees k-space K[coil, ky, kx]: forward FFT of the hybrid rows along x
    kspace = fftc(noisy.numpy().transpose(0, 2, 1), axes=(-1,))
    calibration = kspace[:, calibration_lines(mask), :]
    matrix = coil_compression_matrix(calibration, 8)
    measured = compress(kspace * mask[None, :, None], matrix)
    scale = normalisation_scale(measured, mask)
    hybrid_np = ifftc(measured, axes=(-1,)) / scale                       # [C, ky, x]

    torch_matrix = batch["compression"][0, :, :coils].numpy()
    torch_rows = batch["inputs"].numpy()                                  # [x, 2C, ky]
    hybrid_t = (torch_rows[:, :8] + 1j * torch_rows[:, 8:]).transpose(1, 2, 0)
    assert float(batch["scale"][0]) == pytest.approx(scale, rel=1e-4)
    kept = min(coils, 8)
    for v in range(kept):   # SVD vectors are unique up to a phase per virtual coil
        phase = np.vdot(torch_matrix[v], matrix[v])
        phase /= abs(phase)
        np.testing.assert_allclose(torch_matrix[v] * phase, matrix[v], atol=2e-4)
        np.testing.assert_allclose(hybrid_t[v] * phase, hybrid_np[v], atol=2e-4 * np.abs(hybrid_np).max())
    assert np.abs(hybrid_t[kept:]).max(initial=0.0) == 0.0


# ----------------------------------------------------------------------------- network
@pytest.mark.parametrize("rows,ny", [(1, 33), (3, 64), (5, 130)])
def test_network_any_row_length_and_batch(rows, ny):
    model = _randomised(PisfNet(PisfConfig(blocks=2, features=8, res_units=1)))
    kspace = torch.randn(rows, 16, ny)
    mask = (torch.rand(rows, 1, ny) > 0.5).float()
    with torch.no_grad():
        out = model(kspace, mask)
    assert out.shape == (rows, 16, ny)
    assert torch.allclose(out * mask, kspace * mask)                     # data consistency


def test_parameter_and_mac_counts():
    full = PisfNet(PisfConfig(blocks=10, features=64))
    assert 1.05e6 < parameter_count(full) < 1.2e6                         # ~1.13 M (REFERENCE 4)
    macs = macs_per_pixel(full.cfg, 256)
    assert 0.9e6 < macs["cnn"] < 1.1e6                                     # ~1.04 M MACs/px (authors)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    s = synth.Synthesizer(synth.SynthConfig(pixels_per_batch=2048), seed=1)
    batch = s.batch(ny=64)
    model = PisfNet(PisfConfig(blocks=2, features=8, res_units=1))
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        outputs = model(batch["inputs"], batch["mask"], return_all=True)
        loss = sum(torch.mean((o - batch["target"]) ** 2) for o in outputs)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_onnx_export_parity(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tools.training.export import export_model, parity
    model = _randomised(PisfNet(PisfConfig(blocks=2, features=8, res_units=1)))
    path = export_model(model, tmp_path / "tiny.onnx", {"coils": 8, "pisf_variant": "tiny",
                                                         "training_steps": 0, "contract": "1"})
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["coils"] == "8" and meta["contract"] == "1"
    result = parity(model, path)
    assert result["max_rel_error"] < 1e-4


def test_runtime_modules_do_not_import_torch():
    code = ("import sys; import gadgets.numerics.pisf_inference, tools.training.train, tools.training.export, "
            "tools.evaluation.evaluate, tools.evaluation.metrics; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ----------------------------------------------------------------------------- shipped model
@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="models/pisf_fast.onnx not shipped")
def test_shipped_model_beats_zero_filling_on_a_simulated_slice():
    from gadgets.numerics.pisf_inference import PisfReconstructor
    from tools.evaluation.metrics import psnr, scale_match
    recon = PisfReconstructor(SHIPPED_MODEL, threads=1)
    gains = []
    for seed in (11, 12, 13):   # whole 128x128 slices: rows span the FOV, 12 physical coils
        cfg = synth.SynthConfig(rows_per_slice=128, physical_coils=(12, 12))
        batch = synth.Synthesizer(cfg, seed=seed).batch(
            ny=128, slices=1, snr=60, mask_kind="equispaced", acceleration=4, acs=12,
            partial_fourier=False, n_coils=12)
        noisy = batch["noisy_hybrid"][0].numpy().transpose(0, 2, 1)          # [coils, ky, x]
        kspace = fftc(noisy, axes=(-1,))
        mask = batch["slice_mask"][0].numpy()
        clean = batch["clean_hybrid"][0].numpy().transpose(0, 2, 1)
        reference = np.sqrt((np.abs(ifftc(clean, axes=(-2,))) ** 2).sum(0))   # [y, x]
        image = recon.reconstruct(kspace, mask)
        zf = zero_filled(kspace, mask)
        gains.append(psnr(reference, scale_match(image, reference))
                     - psnr(reference, scale_match(zf, reference)))
    assert min(gains) > 0.0 and float(np.mean(gains)) > 1.0, gains
