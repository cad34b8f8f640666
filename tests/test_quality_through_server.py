"""The pisf chain's images on real data score as the offline evaluation of the same mask."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.numerics.coils import root_sum_of_squares
from gadgets.numerics.pisf_inference import PisfReconstructor, kspace_from_coil_images
from gadgets.wire.client import replay
from conftest import REPO, SHARED_DATA, shipped_chain_text
from tools.evaluation.datasets import phantom_coil_images
from tools.rawdata.kspace_stream import acquisitions_from_kspace
from tools.evaluation.metrics import psnr, scale_match
from tools.rawdata.masks import FASTMRI_CENTRE_FRACTIONS, fastmri_mask

SHIPPED = REPO / "models" / "pisf_fast.onnx"


def float_pisf_chain(model) -> str:
    return shipped_chain_text("pisf", pisf_recon={"model": str(model), "threads": 1},
                              image_finish={"data_type": "float", "scale": 1.0})


@pytest.mark.parametrize("kind", ["equispaced", "random"])
def test_server_pisf_image_scores_as_offline_evaluation(server, kind):
    if not (SHARED_DATA / "phantom_8coil_full.mat").is_file():
        pytest.skip("../shared/data is absent")
    if not SHIPPED.is_file():
        pytest.skip("models/pisf_fast.onnx not shipped")
    coil_images = phantom_coil_images(SHARED_DATA)
    kspace = kspace_from_coil_images(coil_images)
    reference = root_sum_of_squares(coil_images).astype(np.float64)
    mask = fastmri_mask(kspace.shape[1], 4, FASTMRI_CENTRE_FRACTIONS[4], kind, np.random.default_rng(7))

    offline = PisfReconstructor(SHIPPED, threads=1).reconstruct(kspace, mask)
    header, acquisitions = acquisitions_from_kspace(kspace, mask)
    result = replay(None, *server.address, config_text=float_pisf_chain(SHIPPED), header_text=header,
                    acquisitions=acquisitions)
    assert result.closed and not result.errors and result.error is None, result.texts
    [received] = result.images
    served = received.image.data[0, 0].astype(np.float64)
    assert served.shape == offline.shape
    offline_psnr = psnr(reference, scale_match(offline, reference))
    served_psnr = psnr(reference, scale_match(served, reference))
    assert abs(served_psnr - offline_psnr) < 0.05, (served_psnr, offline_psnr)
    np.testing.assert_allclose(served, offline, rtol=1e-3, atol=1e-4 * offline.max())
