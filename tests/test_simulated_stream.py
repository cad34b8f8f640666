"""Simulated scans streamed over loopback: multi-slice, cine phases, oversampling, noise, partial Fourier."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.wire.client import replay
from tools.evaluation.metrics import psnr, scale_match
from tools.rawdata.simulate import simulate


def images_by_key(result):
    return {(r.image.slice, r.image.phase): r.image for r in result.images}


@pytest.fixture(scope="module")
def cine_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "cine.h5"
    # Fully sampled up to the partial-Fourier edge, so that images can be told apart by content.
    truth = simulate(path, matrix=96, coils=6, accel=1, acs=0, slices=3, phases=4, oversampling=2,
                     noise=0.01, partial_fourier=0.8, seed=5)
    return path, truth


def test_every_slice_and_phase_gets_its_image_with_geometry(server, cine_scan):
    path, truth = cine_scan
    result = replay(path, *server.address, config="zerofill")
    assert result.closed and result.error is None and not result.texts
    images = images_by_key(result)
    assert sorted(images) == [(s, p) for s in range(3) for p in range(4)]
    for (slice_index, _), image in images.items():
        assert tuple(image.matrix_size) == (96, 96, 1)  # oversampling removed, recon matrix
        # Slice positions follow the simulated stack along the slice direction.
        assert np.isclose(image.position[2], truth["slice_position_mm"][slice_index], atol=1e-3)
    assert len({image.image_index for image in images.values()}) == 12


def test_zero_filled_images_follow_the_ground_truth(server, cine_scan):
    path, truth = cine_scan
    result = replay(path, *server.address, config="zerofill")
    rss = truth["rss"]
    for (slice_index, phase), image in images_by_key(result).items():
        recon = scale_match(image.data[0, 0].astype(float), rss[slice_index, phase])
        own = psnr(rss[slice_index, phase], recon)
        # The image matches its own slice and phase better than any other one (no mix-up).
        others = [psnr(rss[s, p], scale_match(image.data[0, 0].astype(float), rss[s, p]))
                  for s in range(3) for p in range(4)
                  if not np.allclose(rss[s, p], rss[slice_index, phase])]  # cine is periodic
        assert own > 25 and own > max(others) + 1.0, (slice_index, phase, own, max(others))


def test_fully_sampled_noise_free_scan_reproduces_the_ground_truth(server, tmp_path):
    path = tmp_path / "full.h5"
    truth = simulate(path, matrix=64, coils=4, accel=1, acs=0, slices=2, phases=1, oversampling=2, noise=0.0)
    result = replay(path, *server.address, config="zerofill")
    assert len(result.images) == 2
    for (slice_index, phase), image in images_by_key(result).items():
        reference = truth["rss"][slice_index, phase]
        recon = scale_match(image.data[0, 0].astype(float), reference)
        assert psnr(reference, recon) > 50  # only 16-bit quantisation separates them


def test_realtime_pacing_streams_at_scan_speed(server, tmp_path):
    # GRE with TR 10 ms: 40 lines take about 0.4 s when paced by their time stamps.
    path = tmp_path / "paced.h5"
    simulate(path, matrix=64, coils=2, accel=2, acs=8, slices=1, sequence="gre", tr=10.0, noise=0.01)
    paced = replay(path, *server.address, config="zerofill", realtime=True)
    unpaced = replay(path, *server.address, config="zerofill")
    assert len(paced.images) == len(unpaced.images) == 1
    assert paced.send_seconds > 0.25 > unpaced.send_seconds
