"""The shipped scan-calibrated model through the server gives the offline evaluation's image,
with embedded ACS and with a separate reference scan (real data from ../shared/data)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, shipped_chain_text
from gadgets.numerics.fft import ifftc
from gadgets.numerics.pisf_inference import PisfReconstructor
from gadgets.wire.client import replay
from tools.evaluation.datasets import load_brain16, load_phantom, make_cases, undersample
from tools.rawdata.kspace_stream import acquisitions_from_kspace
from tools.evaluation.metrics import psnr, scale_match

SHIPPED = REPO / "models" / "pisf_v3.onnx"   # the default model of the pisf chain
LOADERS = {"phantom": (load_phantom, "phantom_8coil_full.mat"),
           "brain16": (load_brain16, "brain_16ch_96x96_full_ksp.npy")}


@pytest.mark.parametrize("dataset,case_name", [("brain16", "equispaced_R3_separate"),
                                               ("phantom", "equispaced_R4_embedded")])
def test_server_image_equals_offline_evaluation(server, dataset, case_name):
    loader, filename = LOADERS[dataset]
    if not (SHARED_DATA / filename).is_file():
        pytest.skip("../shared/data is absent")
    data = loader(SHARED_DATA)
    [case] = [c for c in make_cases(dataset, data.kspace.shape[1]) if c.name == case_name]
    image_kspace, calibration = undersample(case, data.kspace)
    offline = PisfReconstructor(SHIPPED, threads=1).reconstruct(image_kspace, case.mask, calibration,
                                                                case.reference_lines)
    header, acquisitions = acquisitions_from_kspace(data.kspace, case.mask, reference_lines=case.reference_lines)
    chain = shipped_chain_text("pisf", pisf_recon={"model": str(SHIPPED), "threads": 1},
                               image_finish={"data_type": "float", "scale": 1.0})
    result = replay(None, *server.address, config_text=chain, header_text=header, acquisitions=acquisitions)
    assert result.closed and not result.errors and result.error is None, result.texts
    [received] = result.images
    served = received.image.data[0, 0].astype(np.float64)
    assert served.shape == offline.shape
    served_psnr = psnr(data.reference, scale_match(served, data.reference))
    offline_psnr = psnr(data.reference, scale_match(offline, data.reference))
    assert abs(served_psnr - offline_psnr) < 0.05, (served_psnr, offline_psnr)
    np.testing.assert_allclose(served, offline, rtol=1e-3, atol=1e-3 * offline.max())
    # better than zero filling the image lines (which, beside a separate reference, alias hard)
    zero_filled = np.sqrt(np.sum(np.abs(ifftc(image_kspace, axes=(1, 2))) ** 2, axis=0))
    margin = 1.0 if case.embedded else 5.0
    assert served_psnr > psnr(data.reference, scale_match(zero_filled, data.reference)) + margin
