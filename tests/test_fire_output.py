"""FIRE-style image output (image_finish fire: true): int16 magnitude with the console's meta attributes."""
from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from conftest import shipped_chain_text
from gadgets.wire.client import replay

pytestmark = pytest.mark.timeout(120)

FIRE_CHAIN = shipped_chain_text("zerofill", image_finish={
    "fire": True, "sequence_description_additional": "PISF_ZF", "series_index": 3})


def test_fire_output_is_int16_with_console_meta(server, shepp_logan_raw):
    fire = replay(shepp_logan_raw, *server.address, config_text=FIRE_CHAIN, timeout_s=60)
    plain = replay(shepp_logan_raw, *server.address, config="zerofill", timeout_s=60)
    assert fire.error is None and fire.closed and fire.errors == []
    assert len(fire.images) == len(plain.images) > 0
    for mine, theirs in zip(fire.images, plain.images):
        image, reference = mine.image, theirs.image
        assert image.data.dtype == np.int16
        assert image.getHead().data_type == ismrmrd.DATATYPE_SHORT
        assert image.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert image.image_series_index == 3
        # same pixels as the unsigned default, just the signed type FIRE consoles expect
        np.testing.assert_array_equal(image.data.astype(np.int32), reference.data.astype(np.int32))
        assert 0 <= image.data.min() and image.data.max() <= 4095
        meta = ismrmrd.Meta.deserialize(image.attribute_string)
        assert meta["DataRole"] == "Image"
        assert meta["ImageProcessingHistory"] == ["PYTHON", "PISF"]
        assert meta["SequenceDescriptionAdditional"] == "PISF_ZF"
        assert meta["Keep_image_geometry"] == "1"
        assert float(meta["WindowWidth"]) > 0 and float(meta["WindowCenter"]) > 0
        np.testing.assert_allclose([float(v) for v in meta["ImageRowDir"]], image.read_dir, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in meta["ImageColumnDir"]], image.phase_dir, atol=1e-6)
    plain_meta = ismrmrd.Meta.deserialize(plain.images[0].image.attribute_string)
    assert "Keep_image_geometry" not in plain_meta  # the default output is unchanged
