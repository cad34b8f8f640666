"""pisf_recon's model-range guard (classical fallback, TEXT warnings), quality signals and
side-by-side series: a stub model for every guard, the shipped model through the server."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gadgets import pisf as pisf_gadget
from gadgets.items import Notice, ReconImage
from gadgets.numerics.calibration import compressed_calibration, compressed_maps
from gadgets.numerics.coils import compress
from gadgets.numerics.fft import ifftc
from gadgets.numerics.pisf_inference import SliceReconstruction
from gadgets.numerics.reference import reference_block
from gadgets.numerics.sense import sense_tikhonov
from gadgets.wire.client import replay
from tests.test_calibration import centre_lines, synthetic_scan
from tests.test_classical import slice_item
from tools.rawdata.simulate import simulate

RANGES = {"contract": "2", "coils": "8", "trained_ny_min": "32", "trained_ny_max": "256",
          "trained_acceleration_min": "2.0", "trained_acceleration_max": "9.0"}


class StubModel:
    """Stands in for PisfReconstructor: contract 2 returns the Tikhonov SENSE image of the same
    compression and maps as the runtime, with them; `fail` makes it refuse like the real core."""

    def __init__(self, metadata, fail: str | None = None):
        self.metadata = dict(metadata)
        self.contract = self.metadata.get("contract", "1")
        self.virtual_coils, self.variant, self.coils = 16, "stub", 8
        self.session = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
        self.fail, self.calls = fail, 0
        self.scan_calibrated = self.contract in ("2", "3")

    def calibrate(self, kspace, mask, reference_kspace=None, reference_lines=None, **options):
        block, _, _ = reference_block(kspace, mask, reference_kspace, reference_lines)
        return compressed_maps(block, kspace.shape[1:], self.virtual_coils, **options)

    def reconstruct_slice(self, kspace, mask, reference_kspace, reference_lines):
        self.calls += 1
        if self.fail:
            raise ValueError(self.fail)
        block, _, _ = reference_block(kspace, mask, reference_kspace, reference_lines)
        matrix, coil_maps = compressed_maps(block, kspace.shape[1:], self.virtual_coils)
        measured = compress(kspace * mask[None, :, None], matrix)
        image = sense_tikhonov(ifftc(measured, axes=(-1,)), mask, coil_maps, lam=1e-3, iterations=40)
        return SliceReconstruction(np.abs(image).astype(np.float32), mask, measured, matrix, image=image,
                                   maps=coil_maps)

    # the stage runs the core in three steps (the network step in the shared scheduler's batches)
    def prepare_slice(self, kspace, mask, reference_kspace, reference_lines, maps=None):
        if self.fail:
            self.calls += 1
            raise ValueError(self.fail)
        return SimpleNamespace(rows=kspace.shape[-1], batch_key=None,
                               slice=(kspace, mask, reference_kspace, reference_lines))

    def run_prepared(self, prepared):
        return [None] * len(prepared)

    def finish_slice(self, prepared, _output):
        return self.reconstruct_slice(*prepared.slice)


class Context:
    def __init__(self, mode="embedded", trajectory="cartesian"):
        encoding = SimpleNamespace(parallelImaging=SimpleNamespace(calibrationMode=mode), trajectory=trajectory)
        self.header = SimpleNamespace(encoding=[encoding])

    def is_cancelled(self) -> bool:
        return False

    def check_cancelled(self, what: str = "") -> None:
        pass


@pytest.fixture
def stage(monkeypatch):
    def make(metadata=RANGES, fail=None, context=None, **parameters):
        model = StubModel(metadata, fail)
        monkeypatch.setattr(pisf_gadget, "shared_reconstructor", lambda *a, **k: model)
        monkeypatch.setattr(pisf_gadget, "resolve_model", lambda name: Path("stub.onnx"))
        recon = pisf_gadget.PisfRecon(context or Context(), model="stub.onnx", **parameters)
        return recon, model
    return make


def scan(n=64, coils=8, step=4, reference=12, separate=False):
    kspace, _, _ = synthetic_scan(n, coils=coils)
    lines = centre_lines(n, reference)
    mask = np.zeros(n, np.float32)
    mask[1::step] = 1
    if not separate:
        mask[lines] = 1
    return kspace, mask, lines


def run(recon, *items):
    out = list(recon(list(items)))
    return [o.text for o in out if isinstance(o, Notice)], [o for o in out if isinstance(o, ReconImage)]


def test_inside_the_trained_range_the_network_runs_and_reports_its_signals(stage):
    recon, model = stage()
    kspace, mask, lines = scan()
    texts, images = run(recon, slice_item(kspace, mask, lines))
    assert texts == [] and len(images) == 1 and model.calls == 1
    meta = images[0].meta
    assert meta["PISF_Method"] == "PISF" and meta["PISF_Guard"].startswith("pass (trained ranges:")
    assert "acceleration 2-9" in meta["PISF_Guard"] and "ny 32-256" in meta["PISF_Guard"]
    assert float(meta["PISF_DataConsistency"]) < 0.05          # the model's image fits the measured lines
    assert images[0].recon.startswith("PISF stub")


@pytest.mark.parametrize("case, metadata, expected", [
    ("acceleration", {**RANGES, "trained_acceleration_max": "2.5"},
     "acceleration R 2.56 outside the trained range 2-2.5"),
    ("rows", {**RANGES, "trained_ny_min": "128"}, "64 phase-encoding lines outside the trained range 128-256"),
    ("coils", RANGES, "4 receive channels; the model was trained with 8 (virtual) coils"),
    ("3D", RANGES, "3D scan (2 partitions); the model reconstructs 2D slices"),
    ("radial", RANGES, "radial trajectory; the model reconstructs Cartesian data"),
])
def test_each_guard_falls_back_to_the_classical_chain_with_a_text(stage, case, metadata, expected):
    recon, model = stage(metadata, context=Context(trajectory="radial" if case == "radial" else "cartesian"))
    kspace, mask, lines = scan(coils=4 if case == "coils" else 8)
    item = slice_item(kspace, mask, lines, planes=2 if case == "3D" else 1)
    texts, images = run(recon, item)
    assert model.calls == 0                                     # no silent PISF image
    assert len(texts) == 1 and expected in texts[0], texts
    assert texts[0].startswith("PISF not used for slice 0") and "reconstructed with SENSE instead" in texts[0]
    meta = images[0].meta
    assert meta["PISF_Method"] == "SENSE" and meta["PISF_Guard"] == f"fallback: {expected}"
    assert images[0].recon.startswith("PISF not used: SENSE")
    assert images[0].data.shape[0] == (2 if case == "3D" else 1)


def test_too_few_reference_lines_for_contract_2_fall_back_to_zero_filled_with_two_texts(stage):
    recon, model = stage()
    kspace, mask, lines = scan(reference=4)
    texts, images = run(recon, slice_item(kspace, mask, lines))
    assert model.calls == 0
    assert "4 contiguous reference lines; the model calibrates its coil maps on at least 6" in texts[0]
    assert "SENSE needs at least 6 contiguous reference lines" in texts[1]
    assert images[0].meta["PISF_Method"] == "zero-filled"


def test_a_model_that_refuses_the_slice_falls_back_too(stage):
    recon, model = stage(fail="the scan carries 3 contiguous reference lines")
    kspace, mask, lines = scan()
    texts, images = run(recon, slice_item(kspace, mask, lines))
    assert model.calls == 1 and "the PISF model refused the slice: the scan carries 3" in texts[0]
    assert images[0].meta["PISF_Method"] == "SENSE"


def test_the_same_reason_is_announced_once_per_stream_and_grappa_can_be_the_fallback(stage):
    recon, _ = stage({**RANGES, "trained_acceleration_max": "2"}, fallback="grappa")
    kspace, mask, lines = scan()
    texts, images = run(recon, *[slice_item(kspace, mask, lines) for _ in range(3)])
    assert len(texts) == 1 and "GRAPPA" in texts[0] and len(images) == 3
    assert all(i.meta["PISF_Method"] == "GRAPPA" for i in images)


def test_the_default_fallback_is_the_classical_choice_by_geometry(stage):
    """fallback: classical (the default) reconstructs as the classical chain would: SENSE (lambda
    chosen per slice) where GRAPPA is weak by geometry, GRAPPA on a regular mask with coils to spare."""
    recon, _ = stage({**RANGES, "trained_acceleration_max": "1.5"})
    assert recon.fallback == "classical"
    kspace, mask, lines = scan(coils=4)                          # gap 4 with 4 coils: SENSE
    texts, images = run(recon, slice_item(kspace, mask, lines))
    meta = images[0].meta
    assert meta["PISF_Method"] == "SENSE" and meta["PISF_MethodChoice"].startswith("SENSE: GRAPPA weak here (4 coils")
    assert meta["PISF_LambdaChoice"].startswith("auto (") and "reconstructed with SENSE instead" in texts[0]
    recon, _ = stage({**RANGES, "trained_acceleration_max": "1.5"})
    kspace, mask, lines = scan(coils=16, step=2)                 # gap 2 with 16 coils: GRAPPA
    texts, images = run(recon, slice_item(kspace, mask, lines))
    meta = images[0].meta
    assert meta["PISF_Method"] == "GRAPPA" and meta["PISF_MethodChoice"].startswith("GRAPPA: regular line pattern")
    assert meta["PISF_Guard"].startswith("fallback: acceleration R ") and "reconstructed with GRAPPA instead" in texts[0]


def test_models_without_trained_ranges_are_named_once(stage):
    recon, model = stage({"contract": "2", "coils": "8"})
    kspace, mask, lines = scan(step=8)                         # R 2.7 .. any: unchecked
    texts, images = run(recon, slice_item(kspace, mask, lines), slice_item(kspace, mask, lines))
    assert len(texts) == 1 and "carries no trained ranges in its metadata (contract 2)" in texts[0]
    assert model.calls == 2
    assert images[0].meta["PISF_Guard"].startswith("pass (model metadata has no trained ranges")


@pytest.mark.parametrize("side", ["sense", "grappa"])
def test_side_by_side_sends_the_classical_image_as_its_own_series(stage, side):
    recon, _ = stage(side_by_side=side)
    kspace, mask, lines = scan()
    texts, images = run(recon, slice_item(kspace, mask, lines))
    assert texts == [] and len(images) == 2
    pisf, classical = images
    assert pisf.meta["PISF_Method"] == "PISF" and "PISF_SeriesIndex" not in pisf.meta
    assert classical.meta["PISF_Method"] == side.upper()
    assert classical.meta["PISF_SeriesIndex"] == ("4" if side == "sense" else "3")
    assert pisf.meta["PISF_ClassicalMethod"] == side.upper()
    assert float(pisf.meta["PISF_DiffToClassical"]) < 0.1     # the stub is SENSE itself


def test_side_by_side_on_a_fallback_slice_keeps_both_series(stage):
    recon, _ = stage({**RANGES, "trained_acceleration_max": "2"}, side_by_side="sense")
    kspace, mask, lines = scan()
    _, images = run(recon, slice_item(kspace, mask, lines))
    assert [i.meta.get("PISF_SeriesIndex") for i in images] == [None, "4"]
    assert all(i.meta["PISF_Method"] == "SENSE" for i in images)


# ----------------------------------------------------------------------------- the shipped model
SHIPPED = pisf_gadget.MODELS_DIR / "pisf_fast.onnx"
needs_model = pytest.mark.skipif(not SHIPPED.is_file(), reason="models/pisf_fast.onnx not shipped")


@needs_model
def test_guard_through_the_server_with_ranges_added_to_the_shipped_model(server, tmp_path):
    onnx = pytest.importorskip("onnx")
    from conftest import shipped_chain_text
    model = onnx.load(str(SHIPPED))
    for key, value in {"trained_acceleration_min": "2", "trained_acceleration_max": "3",
                       "trained_ny_min": "64", "trained_ny_max": "512"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "ranged.onnx"
    onnx.save(model, str(path))
    raw = tmp_path / "r4.h5"
    simulate(raw, matrix=64, coils=8, accel=8, acs=8, slices=2, noise=0.01)
    chain = shipped_chain_text("pisf", pisf_recon={"model": str(path), "threads": 1})
    result = replay(raw, *server.address, config_text=chain)
    assert result.closed and result.error is None and not result.errors
    warnings = [t for t in result.texts if "PISF not used" in t]
    assert len(warnings) == 1 and re.search(r"acceleration R \d\.\d\d outside the trained range 2-3", warnings[0])
    assert len(result.images) == 2
    for received in result.images:
        meta = received.image.meta
        assert received.image.image_series_index == 2
        assert meta["PISF_Method"] == "SENSE" and meta["PISF_Guard"].startswith("fallback: acceleration R ")
        assert meta["ImageComment"].startswith("PISF not used: SENSE")


@needs_model
def test_pisf_compare_chain_sends_two_series_with_signals(server, tmp_path):
    raw = tmp_path / "scan.h5"
    simulate(raw, matrix=64, coils=8, accel=3, acs=16, slices=2, noise=0.01)
    result = replay(raw, *server.address, config="pisf_compare")
    assert result.closed and result.error is None and not result.errors
    by_series = {}
    for received in result.images:
        by_series.setdefault(received.image.image_series_index, []).append(received.image)
    assert sorted(by_series) == [2, 3] and [len(v) for v in by_series.values()] == [2, 2]
    assert sorted(i.image_index for i in by_series[3]) == [1, 2]
    for image in by_series[2]:
        # the shipped scan-calibrated model keeps the measured lines up to noise (sim noise 0.01)
        assert image.meta["PISF_Method"] == "PISF" and 0 < float(image.meta["PISF_DataConsistency"]) < 0.1
        assert 0 < float(image.meta["PISF_DiffToClassical"]) < 1
    assert all(i.meta["PISF_Method"] == "GRAPPA" for i in by_series[3])
    assert by_series[3][0].meta["PISF_ScaleFactor"] != by_series[2][0].meta["PISF_ScaleFactor"]


def test_espirit_runs_once_per_slice_on_contract_2(stage, monkeypatch):
    """The side-by-side SENSE image reuses the compression and maps the core calibrated (and its
    residual used): the classical core runs no ESPIRiT of its own on a PISF slice."""
    from gadgets import classical
    calls = []
    monkeypatch.setattr(classical, "compressed_calibration",
                        lambda *a, **k: calls.append(1) or compressed_calibration(*a, **k))
    recon, model = stage(side_by_side="sense")
    kspace, mask, lines = scan()
    _, images = run(recon, slice_item(kspace, mask, lines))
    assert model.calls == 1 and calls == []
    assert [i.meta["PISF_Method"] for i in images] == ["PISF", "SENSE"]
    assert float(images[0].meta["PISF_DiffToClassical"]) < 0.1   # the stub is SENSE on the same maps
    recon, _ = stage({**RANGES, "trained_acceleration_max": "2"}, side_by_side="sense")
    run(recon, slice_item(kspace, mask, lines))                  # a fallback slice calibrates itself
    assert len(calls) == 1


FEW_COILS = {**RANGES, "trained_coils_min": "2", "trained_coil_acceleration": "2:2,4:4,8:9"}


@pytest.mark.parametrize("coils, runs", [(4, True), (2, False), (8, True)])
def test_few_coil_slices_run_the_model_up_to_the_acceleration_it_was_trained_with(stage, coils, runs):
    """A model trained on 2- and 4-channel arrays (R <= channels) takes a 4-channel slice at R 2.56
    and refuses a 2-channel one at the same R, naming the limit."""
    recon, model = stage(FEW_COILS)
    kspace, mask, lines = scan(coils=coils)
    texts, images = run(recon, slice_item(kspace, mask, lines))
    assert model.calls == (1 if runs else 0)
    if runs:
        assert texts == [] and images[0].meta["PISF_Method"] == "PISF"
    else:
        assert len(texts) == 1 and "2 receive channels at R 2.56" in texts[0]
        assert "trained with 2-channel arrays up to R 2" in texts[0]
        assert images[0].meta["PISF_Method"] == "SENSE"


def test_coil_acceleration_limit_reads_the_covering_entry():
    table = {"trained_coil_acceleration": "2:2,4:4,8:9"}
    assert pisf_gadget.coil_acceleration_limit(table, 3) == (2, 2.0)
    assert pisf_gadget.coil_acceleration_limit(table, 16) == (8, 9.0)
    assert pisf_gadget.coil_acceleration_limit(table, 1) is None
    assert pisf_gadget.coil_acceleration_limit({}, 4) is None
    assert pisf_gadget.coil_acceleration_limit({"trained_coil_acceleration": "junk"}, 4) is None
