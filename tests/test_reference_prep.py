"""Reference preparation (gadgets/reference_prep.py): one calibration per slice position and
reference, started as soon as a separate reference scan is complete, handed to every image that
calibrates on the same reference data; images bit-identical to calibrating each one inline."""
from __future__ import annotations

import threading
import time

import ismrmrd
import numpy as np
import pytest

from gadgets.accumulate import SliceAccumulator
from gadgets.chain import run_stages
from gadgets.classical import SenseRecon
from gadgets.context import StreamContext, parse_header
from gadgets.items import KSpaceSlice, ReconImage, ReferenceData
from gadgets.reference_prep import WORKERS, CalibrationCache, CalibrationRecipe, ReferencePrep
from gadgets.slices import slice_data
from gadgets.wire.client import read_raw, replay
from tests.conftest import shipped_chain_text
from tools.rawdata.simulate import simulate

SLICES, PHASES = 2, 4


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    """{reference kind: path} of a 2-slice, 4-phase cine (64 x 64, 8 coils, R4; 24 lines of separate
    reference, or 16 embedded ACS lines so that the embedded scan stays inside PISF's trained R)."""
    folder = tmp_path_factory.mktemp("cine")
    paths = {}
    for kind, acs in (("separate", 24), ("embedded", 16)):
        paths[kind] = folder / f"{kind}.h5"
        simulate(paths[kind], matrix=64, coils=8, accel=4, acs=acs, slices=SLICES, phases=PHASES, sequence="gre",
                 noise=0.01, seed=4, reference=kind)
    return paths


def by_key(result):
    assert result.error is None and result.closed, result.error
    return {(image.slice, image.phase): image for image in (r.image for r in result.images)}


def run_chain(server, path, chain, **overrides):
    return by_key(replay(path, *server.address, config_text=shipped_chain_text(chain, **overrides)))


@pytest.mark.parametrize("chain, method", [("pisf", "PISF"), ("sense", "SENSE")])
def test_separate_reference_cine_calibrates_once_per_slice_position(server, cine, chain, method):
    reused = run_chain(server, cine["separate"], chain)
    inline = run_chain(server, cine["separate"], chain, reference_prep={"reuse": False})
    assert sorted(reused) == sorted(inline) == [(s, p) for s in range(SLICES) for p in range(PHASES)]
    computed = [key for key, image in reused.items() if image.meta["PISF_CalibrationReused"] == "false"]
    assert sorted(computed) == [(s, 0) for s in range(SLICES)]         # slice positions, not slices x phases
    assert all(image.meta["PISF_CalibrationWhere"] == "background" for image in reused.values())
    assert all(image.meta["PISF_CalibrationReused"] == "false" for image in inline.values())
    for key, image in reused.items():
        assert image.meta["PISF_Method"] == method                   # every phase calibrates on the reference
        assert float(image.meta["PISF_CalibrationMs"]) > 0
        assert np.array_equal(image.data, inline[key].data), key      # reuse changes no pixel


def test_without_the_stage_later_phases_of_a_separate_reference_have_none(server, cine):
    """Why the stage shares the reference: without it, phases after the first carry no reference lines."""
    plain = yaml_without_reference_prep("pisf")
    images = by_key(replay(cine["separate"], *server.address, config_text=plain))
    assert images[(0, 0)].meta["PISF_Method"] == "PISF"
    assert images[(0, 1)].meta["PISF_Method"] != "PISF"


def yaml_without_reference_prep(chain: str) -> str:
    import yaml
    spec = yaml.safe_load(shipped_chain_text(chain))
    spec["stages"] = [stage for stage in spec["stages"] if stage["gadget"] != "reference_prep"]
    return yaml.safe_dump(spec)


@pytest.mark.parametrize("chain", ["pisf", "sense"])
def test_embedded_acs_are_calibrated_per_image_as_without_the_stage(server, cine, chain):
    """Each phase's own ACS lines differ (motion, noise): nothing is reused, and the images are
    those of the chain without reference_prep."""
    staged = run_chain(server, cine["embedded"], chain)
    plain = by_key(replay(cine["embedded"], *server.address, config_text=yaml_without_reference_prep(chain)))
    assert all(image.meta["PISF_CalibrationReused"] == "false" for image in staged.values())
    assert all(image.meta["PISF_CalibrationWhere"] == "inline" for image in staged.values())
    for key, image in staged.items():
        assert image.meta["PISF_Method"] == {"pisf": "PISF", "sense": "SENSE"}[chain]
        assert np.array_equal(image.data, plain[key].data), key


def test_calibration_starts_before_the_first_image_line_through_the_server(server, cine):
    """Paced replay with the reference scan 0.5 s before the image lines (as a scanner pauses
    between them): every slice position's calibration began before its first image line arrived,
    and no image waited for it."""
    header, acquisitions = read_raw(cine["separate"])
    first_image = next(i for i, a in enumerate(acquisitions)
                       if not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                       and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    for acquisition in acquisitions[first_image:]:
        acquisition.acquisition_time_stamp += 200        # 2.5 ms ticks: 0.5 s
    result = replay(None, *server.address, config_text=shipped_chain_text("sense"), realtime=True,
                    header_text=header, acquisitions=acquisitions)
    images = by_key(result)
    assert len(images) == SLICES * PHASES
    for key, image in images.items():
        assert image.meta["PISF_CalibrationWhere"] == "background", key
        assert float(image.meta["PISF_CalibrationLeadMs"]) > 0, (key, image.meta["PISF_CalibrationLeadMs"])
        assert float(image.meta["PISF_CalibrationWaitMs"]) < 20, (key, image.meta["PISF_CalibrationWaitMs"])


def stage_chain(header_text: str, **prep):
    context = StreamContext(header=parse_header(header_text))
    stages = [SliceAccumulator(context), ReferencePrep(context, **prep), SenseRecon(context)]
    return context, stages


@pytest.mark.parametrize("last_in_slice", [False, True])
def test_the_reference_is_calibrated_while_the_image_lines_have_not_come(cine, tmp_path, last_in_slice):
    """The stream holds back its first image line until the calibration of slice position 0 is
    done; it is only done if the stage started it from the reference lines alone: in a
    multi-slice scan at the next slice's reference, in a single-slice scan at a reference line
    flagged ACQ_LAST_IN_SLICE."""
    path = cine["separate"]
    if last_in_slice:
        path = tmp_path / "single.h5"
        simulate(path, matrix=64, coils=8, accel=4, acs=24, slices=1, phases=2, sequence="gre", seed=4,
                 reference="separate")
    header, acquisitions = read_raw(path)
    acquisitions = [a for a in acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    references = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    if last_in_slice:
        references[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    context, stages = stage_chain(header)
    prep = stages[1]
    first_image_line = {}

    def stream():
        for acquisition in acquisitions:
            if acquisition not in references and not first_image_line:
                deadline = time.monotonic() + 15
                while not (prep.cache.tasks and all(t.state == "done" for t in prep.cache.tasks.values())
                           ) and time.monotonic() < deadline:
                    time.sleep(0.01)
                first_image_line["at"] = time.monotonic()
            context.last_arrival = time.monotonic()
            yield acquisition

    images = [item for item in run_stages(stages, stream()) if isinstance(item, ReconImage)]
    task = next(task for key, task in prep.cache.tasks.items() if key[0] == 0)
    assert task.where == "background" and task.state == "done"
    assert task.started < first_image_line["at"]
    first = [image for image in images if image.key.slice == 0][0]
    assert first.meta["PISF_CalibrationWhere"] == "background" and first.meta["PISF_CalibrationReused"] == "false"
    assert float(first.meta["PISF_CalibrationWaitMs"]) < 20


def test_accumulator_emits_a_separate_reference_only_for_a_reference_prep_stage(cine):
    header, acquisitions = read_raw(cine["separate"])
    acquisitions = [a for a in acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    references = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    context = StreamContext(header=parse_header(header))
    plain = list(SliceAccumulator(context)(iter(acquisitions)))
    assert not any(isinstance(item, ReferenceData) for item in plain)   # Gadgetron would get them otherwise
    context.reference_preparation = object()
    items = list(SliceAccumulator(context)(iter(acquisitions)))
    emitted = [(n, item) for n, item in enumerate(items) if isinstance(item, ReferenceData)]
    assert [item.key.slice for _, item in emitted] == list(range(SLICES))
    assert emitted[-1][0] < min(n for n, item in enumerate(items) if isinstance(item, KSpaceSlice))
    for _, reference in emitted:
        lines = [a for a in references if a.idx.slice == reference.key.slice]
        grid, sampled = reference.grid()
        assert int(sampled.sum()) == len(lines) == 24
        for line in lines:
            row = context.encoding.ky_row(line.idx.kspace_encode_step_1)
            assert np.array_equal(grid[:, 0, row, :], line.data)


def test_a_shared_reference_never_becomes_image_data(cine):
    header, acquisitions = read_raw(cine["separate"])
    context = StreamContext(header=parse_header(header))
    items = list(run_stages([SliceAccumulator(context), ReferencePrep(context)], iter(acquisitions)))
    later = next(i for i in items if isinstance(i, KSpaceSlice) and i.key.phase == 2)
    assert later.reference_shared and later.reference is not None and later.reference.shared
    as_data = slice_data(later, acs_as_data=True)
    assert np.array_equal(as_data.kspace, later.kspace[:, 0]) and as_data.has_reference_lines()


def test_cache_is_bounded_and_recomputes_what_it_evicted():
    rng = np.random.default_rng(0)
    blocks = [(rng.standard_normal((4, 12, 32)) + 1j * rng.standard_normal((4, 12, 32))).astype(np.complex64)
              for _ in range(3)]
    recipe = CalibrationRecipe(4)
    cache = CalibrationCache(max_bytes=2 * 8 * 4 * (32 * 32 + 4))    # two calibrations
    for n, block in enumerate(blocks):
        task, created = cache.task((n, "f", recipe), lambda b=block: recipe.compute(b, (32, 32)), 8 * 4 * (32 * 32 + 4))
        assert created
    assert [key[0] for key in cache.tasks] == [1, 2] and cache.nbytes <= cache.max_bytes
    again, created = cache.task((0, "f", recipe), lambda: recipe.compute(blocks[0], (32, 32)), 8 * 4 * (32 * 32 + 4))
    assert created and [key[0] for key in cache.tasks] == [2, 0]
    first, second = again.take(), cache.tasks[(0, "f", recipe)].take()
    assert not first.reused and second.reused and first.where == "inline"
    assert np.array_equal(first.maps, recipe.compute(blocks[0], (32, 32))[1])


def test_a_worker_and_a_stage_compute_a_task_once():
    calls = []
    gate = threading.Event()

    def compute():
        calls.append(threading.current_thread().name)
        gate.wait(5)
        return np.zeros((1, 1)), np.zeros((1, 1, 1))
    from gadgets.reference_prep import CalibrationTask
    task = CalibrationTask(compute, 8)
    WORKERS.submit(task, lambda: False)
    deadline = time.monotonic() + 5
    while task.state == "pending" and time.monotonic() < deadline:
        time.sleep(0.005)
    threading.Timer(0.05, gate.set).start()
    use = task.take()                                    # waits for the worker, does not compute again
    assert calls == ["pisf-calibration-1"] and use.where == "background" and use.held > 0


def test_simulated_separate_reference_comes_first_and_only_calibrates(cine):
    header, acquisitions = read_raw(cine["separate"])
    assert parse_header(header).encoding[0].parallelImaging.calibrationMode.value == "separate"
    lines = [a for a in acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    is_reference = [a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for a in lines]
    assert is_reference == [True] * SLICES * 24 + [False] * (len(lines) - SLICES * 24)
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) for a in lines)
    assert {a.idx.phase for a in lines[:SLICES * 24]} == {0}
    assert len(lines) - SLICES * 24 == SLICES * PHASES * 16        # image lines: every 4th of 64
    with pytest.raises(ValueError, match="separate reference"):
        simulate(cine["separate"].parent / "none.h5", matrix=32, coils=2, acs=0, reference="separate")
