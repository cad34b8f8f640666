"""Slices in flight (issue 17 item 3, issue 19 item 5): the server-wide bound, batched inference
across slices and connections, and a departed client's work stopped.

The scheduler alone (no model), then the PISF core batched (bit-identical to one slice at a time),
then through the server: concurrent connections equal one connection, the bound holds, and a
client that leaves mid-scan has the rest of its scan not reconstructed.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gadgets import pisf as pisf_gadget
from gadgets.context import StreamCancelled, StreamContext
from gadgets.inference_pool import ADMISSION, Admission, Cancelled, InferenceScheduler
from gadgets.numerics.pisf_inference import PisfReconstructor
from gadgets.wire import protocol
from gadgets.wire.client import read_raw, replay

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent
MODELS = pisf_gadget.MODELS_DIR


def wait_until(condition, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.01)


class GatedBatches:
    """run_batch that records every batch and holds the worker in the first one until `gate` opens."""

    def __init__(self, run=lambda payloads: [p * 10 for p in payloads]):
        self.run, self.batches = run, []
        self.gate, self.entered = threading.Event(), threading.Event()

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.entered.set()
        assert self.gate.wait(30)
        return self.run(payloads)


# ---------------------------------------------------------------- the scheduler alone

def test_queued_jobs_of_one_key_run_as_one_batch_within_the_row_budget():
    batches = GatedBatches()
    scheduler = InferenceScheduler(batches, max_rows_per_batch=700)
    first = scheduler.submit(1, rows=256, key="a")
    assert batches.entered.wait(10)      # the worker holds job 1; everything below queues behind it
    queued = [scheduler.submit(n, rows=256, key="a") for n in (2, 3, 4)] + [scheduler.submit(5, rows=128, key="b")]
    batches.gate.set()
    assert [f.result(10) for f in [first] + queued] == [10, 20, 30, 40, 50]
    # 2 and 3 fill the 700-row budget (4 would make 768); 4 is next oldest; 5 has another key
    assert batches.batches == [[1], [2, 3], [4], [5]]
    assert scheduler.counts.largest_batch_jobs == 2 and scheduler.counts.rows_run == 4 * 256 + 128
    scheduler.close()


def test_row_budget_zero_runs_every_job_alone():
    batches = GatedBatches()
    scheduler = InferenceScheduler(batches, max_rows_per_batch=0)
    futures = [scheduler.submit(1, rows=8, key="a")]
    assert batches.entered.wait(10)
    futures += [scheduler.submit(n, rows=8, key="a") for n in (2, 3)]
    batches.gate.set()
    assert [f.result(10) for f in futures] == [10, 20, 30]
    assert batches.batches == [[1], [2], [3]]
    scheduler.close()


def test_a_cancelled_job_is_dropped_from_the_queue_and_gives_its_slot_back():
    admission = Admission(limit=2)
    batches = GatedBatches()
    scheduler = InferenceScheduler(batches)
    gone = threading.Event()
    first = scheduler.submit(1, rows=4, key="a", slot=admission.acquire())
    assert batches.entered.wait(10)
    dropped = scheduler.submit(2, rows=4, key="a", cancelled=gone.is_set, slot=admission.acquire())
    assert admission.in_flight == 2
    gone.set()
    batches.gate.set()
    assert first.result(10) == 10
    with pytest.raises(Cancelled):
        dropped.result(10)
    assert batches.batches == [[1]] and scheduler.counts.jobs_dropped == 1
    assert admission.in_flight == 0
    scheduler.close()


def test_one_failing_slice_does_not_fail_its_batch_mates():
    def run(payloads):
        if "bad" in payloads:
            raise ValueError("refused")
        return [p.upper() for p in payloads]
    batches = GatedBatches(run)
    scheduler = InferenceScheduler(batches)
    futures = [scheduler.submit("x", rows=1, key="a")]
    assert batches.entered.wait(10)
    futures += [scheduler.submit(p, rows=1, key="a") for p in ("y", "bad", "z")]
    batches.gate.set()
    assert [futures[i].result(10) for i in (0, 1, 3)] == ["X", "Y", "Z"]
    with pytest.raises(ValueError, match="refused"):
        futures[2].result(10)


def test_admission_bounds_slices_in_flight_and_a_waiting_stage_can_be_cancelled():
    admission = Admission(limit=2)
    first, second = admission.acquire(), admission.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(admission.acquire()))
    waiter.start()
    time.sleep(0.3)
    assert not got and admission.in_flight == 2          # the third waits
    first.release()
    first.release()                                        # idempotent: gives back one slot, once
    waiter.join(5)
    assert len(got) == 1 and admission.in_flight == 2 and admission.peak == 2 and admission.waits == 1
    gone = threading.Event()
    threading.Timer(0.2, gone.set).start()
    with pytest.raises(Cancelled):
        admission.acquire(gone.is_set)                     # full, and its client goes meanwhile
    second.release()
    got[0].release()
    assert admission.in_flight == 0
    with pytest.raises(ValueError, match="at least 1"):
        Admission(limit=0)


# ---------------------------------------------------------------- the PISF core batched

def _scan(ny: int, step: int, offset: int, seed: int):
    from tests.test_calibration import centre_lines, synthetic_scan
    kspace, _, _ = synthetic_scan(ny, coils=8)
    kspace = kspace * np.exp(1j * seed)                    # a different slice, same size
    lines = centre_lines(ny, 16)
    mask = np.zeros(ny, np.float32)
    mask[offset::step] = 1
    mask[lines] = 1
    return kspace * mask[None, :, None], mask, kspace * lines[None, :, None], lines


@pytest.mark.parametrize("model", ["pisf_v3.onnx", "pisf_sense.onnx", "pisf_fast.onnx"])
def test_slices_batched_together_give_the_images_they_give_alone(model):
    """Rows carry their own masks and maps: slices of different masks in one batch give
    bit-identical images to one slice per run (onnxruntime CPU, numpy FFT data consistency)."""
    if not (MODELS / model).is_file():
        pytest.skip(f"models/{model} not shipped")
    recon = PisfReconstructor(MODELS / model, threads=1, max_rows_per_run=24)   # chunks straddle slices
    scans = [_scan(64, 3, 0, 0), _scan(64, 4, 1, 1), _scan(64, 2, 0, 2)]
    prepared = [recon.prepare_slice(*scan) for scan in scans]
    assert len({p.batch_key for p in prepared}) == 1
    together = [recon.finish_slice(p, out) for p, out in zip(prepared, recon.run_prepared(prepared))]
    for scan, batched in zip(scans, together):
        alone = recon.reconstruct_slice(*scan)
        np.testing.assert_array_equal(batched.magnitude, alone.magnitude)
        assert batched.data_consistency() == alone.data_consistency()
    assert not np.array_equal(together[0].magnitude, together[1].magnitude)


def test_the_pisf_stage_starts_nothing_for_a_client_that_has_gone(tmp_path):
    from tests.test_classical import slice_item
    from tools.rawdata.simulate import simulate
    simulated = simulate(tmp_path / "h.h5", matrix=64, coils=8, accel=3, acs=16)
    header = __import__("ismrmrd").xsd.CreateFromDocument(simulated["header_xml"])
    context = StreamContext(header)
    stage = pisf_gadget.PisfRecon(context, model="pisf_v3.onnx", threads=1)
    kspace, mask, reference, lines = _scan(64, 3, 0, 0)
    item = slice_item(kspace, mask, lines)
    assert [o for o in stage([item]) if hasattr(o, "meta")]      # alive: an image
    jobs = stage.scheduler.counts.jobs_run
    context.cancelled.set()
    with pytest.raises(StreamCancelled):
        list(stage([item]))
    assert stage.scheduler.counts.jobs_run == jobs


def _stage(tmp_path, **parameters):
    from tools.rawdata.simulate import simulate
    simulated = simulate(tmp_path / "h.h5", matrix=64, coils=8, accel=3, acs=16)
    header = __import__("ismrmrd").xsd.CreateFromDocument(simulated["header_xml"])
    return pisf_gadget.PisfRecon(StreamContext(header), model="pisf_v3.onnx", threads=1, **parameters)


def _slices(count: int):
    from dataclasses import replace
    from gadgets.items import SliceKey
    from tests.test_classical import slice_item
    items = []
    for k in range(count):
        kspace, mask, _, lines = _scan(64, 3 + k % 2, k % 2, k)
        items.append(replace(slice_item(kspace, mask, lines), key=SliceKey(k, 0, 0, 0, 0)))
    return items


def test_a_stream_s_slices_run_ahead_share_batches_and_leave_in_order(tmp_path, monkeypatch):
    """slices_ahead 3: while the worker holds slice 0, the stream's next two slices are prepared
    and queued, then run as one batch; outputs keep the stream's order (a TEXT between slices
    stays between their images) and equal those of the one-at-a-time stage, bit for bit."""
    from gadgets.items import Notice
    if not (MODELS / "pisf_v3.onnx").is_file():
        pytest.skip("models/pisf_v3.onnx not shipped")
    items = _slices(4)
    items.insert(1, Notice("between slices 0 and 1"))
    serial = list(_stage(tmp_path, slices_ahead=1)(items))
    stage = _stage(tmp_path, slices_ahead=3)
    gated = GatedBatches(run=stage.scheduler.run_batch)
    monkeypatch.setattr(stage.scheduler, "run_batch", gated)
    ahead: list = []
    consumer = threading.Thread(target=lambda: ahead.extend(stage(iter(items))))
    consumer.start()
    wait_until(lambda: gated.entered.is_set() and len(gated.batches[0]) + stage.scheduler.queued == 3,
               what="three slices of one stream in flight")
    gated.gate.set()
    consumer.join(60)
    kinds = [type(o).__name__ if isinstance(o, Notice) else o.key.slice for o in ahead]
    assert kinds == [0, "Notice", 1, 2, 3], kinds
    assert max(len(batch) for batch in gated.batches) >= 2, gated.batches
    for a, b in zip(serial, ahead):
        if not isinstance(a, Notice):
            np.testing.assert_array_equal(a.data, b.data)
            assert a.meta["PISF_DataConsistency"] == b.meta["PISF_DataConsistency"]
    assert max(int(o.meta["PISF_BatchSlices"]) for o in ahead if not isinstance(o, Notice)) >= 2


def test_an_upstream_error_arrives_after_the_images_before_it_and_the_helper_ends(tmp_path):
    from gadgets.context import InputError
    if not (MODELS / "pisf_v3.onnx").is_file():
        pytest.skip("models/pisf_v3.onnx not shipped")
    items = _slices(3)

    def upstream():
        yield from items[:2]
        raise InputError("line 7 is outside the encoding limits")
    stage = _stage(tmp_path, slices_ahead=4)
    outputs = stage(upstream())
    got = [next(outputs).key.slice, next(outputs).key.slice]
    with pytest.raises(InputError, match="outside the encoding limits"):
        next(outputs)
    assert got == [0, 1]
    # a chain that stops early (closes the stage) leaves no helper thread behind
    outputs = stage(iter(items))
    next(outputs)
    outputs.close()
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.endswith("-ahead")],
               what="the stage's helper thread to end")
    with pytest.raises(ValueError, match="at least 1"):
        _stage(tmp_path, slices_ahead=0)


# ---------------------------------------------------------------- through the server

def _chain_text(**pisf_recon) -> str:
    """The shipped pisf chain on the v3 model, one thread, rows unchunked (what the scheduler
    batches), with `pisf_recon` parameters on top."""
    chain = yaml.safe_load((REPO / "config" / "pisf.yaml").read_text())
    for stage in chain["stages"]:
        if stage["gadget"] == "pisf_recon":
            stage.update(model="pisf_v3.onnx", threads=1, max_rows_per_run=0, max_rows_per_batch=1024, **pisf_recon)
    chain["name"] = "pisf-inflight-test"
    return yaml.safe_dump(chain)


@pytest.fixture
def make_server():
    """A server of the test's own (its counters start at zero), shut down after."""
    from gadgets.chain import ChainRepository
    from gadgets.wire.server import ReconServer
    made = []

    def make(**kwargs) -> ReconServer:
        made.append(ReconServer("127.0.0.1", 0, ChainRepository(REPO / "config"), **kwargs))
        made[-1].start_background()
        return made[-1]
    yield make
    for instance in made:
        instance.shutdown(wait_s=5)


@pytest.fixture
def limit():
    """Set the process-wide bound for one test; restored after."""
    before = ADMISSION.limit

    def set_limit(value: int) -> Admission:
        ADMISSION.set_limit(value)
        ADMISSION.reset_peak()
        return ADMISSION
    yield set_limit
    ADMISSION.set_limit(before)


def _scheduler():
    reconstructor = pisf_gadget.shared_reconstructor("pisf_v3.onnx", threads=1, max_rows_per_run=0)
    return pisf_gadget.shared_scheduler(reconstructor, 1024)


def test_concurrent_connections_get_the_images_of_one_connection_batched_and_bounded(server, tmp_path,
                                                                                     limit, monkeypatch):
    """Five clients at once with room for three slices in flight: three slices enter the models
    (the worker held in its first batch), the other two wait for a slot; slices queued behind
    the held batch run together; every image equals the one a single connection gets, bit for bit."""
    from tools.rawdata.simulate import simulate
    if not (MODELS / "pisf_v3.onnx").is_file():
        pytest.skip("models/pisf_v3.onnx not shipped")
    scans = []
    for k in range(5):
        simulate(tmp_path / f"s{k}.h5", matrix=64, coils=8, accel=3, acs=16, slices=1, seed=k, oversampling=1)
        scans.append(read_raw(tmp_path / f"s{k}.h5"))
    text = _chain_text()
    alone = [replay(None, *server.address, config_text=text, header_text=h, acquisitions=a, timeout_s=60)
             for h, a in scans]
    admission = limit(3)
    scheduler = _scheduler()
    gated = GatedBatches(run=scheduler.run_batch)
    monkeypatch.setattr(scheduler, "run_batch", gated)
    together: list = [None] * len(scans)

    def one(k):
        together[k] = replay(None, *server.address, config_text=text, header_text=scans[k][0],
                             acquisitions=scans[k][1], timeout_s=90)
    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(scans))]
    for thread in threads:
        thread.start()
    # the worker holds the first batch (one slice, or more if others queued before it woke)
    wait_until(lambda: gated.entered.is_set() and len(gated.batches[0]) + scheduler.queued == 3
               and admission.waiting == 2,
               what=lambda: (f"three slices in flight, two more waiting for a slot (in flight {admission.in_flight}, "
                             f"queued {scheduler.queued}, waiting {admission.waiting}, worker held "
                             f"{gated.batches[:1]})"))
    assert admission.in_flight == 3
    gated.gate.set()
    for thread in threads:
        thread.join(90)
    assert admission.peak == 3, admission.peak
    assert max(len(batch) for batch in gated.batches) >= 2, gated.batches
    batch_sizes = sorted(int(r.images[0].image.meta["PISF_BatchSlices"]) for r in together)
    assert batch_sizes[-1] >= 2, batch_sizes
    for k, (a, b) in enumerate(zip(alone, together)):
        assert a.errors == b.errors == [] and len(a.images) == len(b.images) == 1, k
        assert a.images[0].image.meta["PISF_Method"] == "PISF", a.images[0].image.meta.get("PISF_Guard")
        np.testing.assert_array_equal(a.images[0].image.data, b.images[0].image.data)
    assert not np.array_equal(alone[0].images[0].image.data, alone[1].images[0].image.data)


@pytest.mark.parametrize("how, ahead", [("close", 1), ("reset", 1), ("close", 4)])
def test_a_client_that_leaves_mid_scan_has_the_rest_not_reconstructed(make_server, tmp_path, caplog, how, ahead):
    """The client sends an 8-slice scan and CLOSE, then leaves without reading its images ('close':
    after reading what came before them, so its FIN is all the server sees until the first image
    sent draws a reset; 'reset': SO_LINGER 0). The server stops at the next slice: at most the
    slices in the network when it learnt finish (with slices_ahead, up to that many of the stream
    may be), queued ones are dropped, and it serves the next client. Before: three slices computed
    after a plain close (issue 19)."""
    from tools.rawdata.simulate import simulate
    from test_server_errors import assert_still_serving
    simulate(tmp_path / "multi.h5", matrix=128, coils=8, accel=3, acs=16, slices=8, oversampling=1)
    header, acquisitions = read_raw(tmp_path / "multi.h5")
    text = _chain_text(slices_ahead=ahead)
    payload = (protocol.frame_config_text(text) + protocol.frame_header(header)
               + b"".join(protocol.frame_acquisition(a) for a in acquisitions) + protocol.frame_close())
    instance = make_server()
    scheduler = _scheduler()
    runs, dropped = scheduler.counts.jobs_run, scheduler.counts.jobs_dropped
    caplog.set_level(logging.INFO, logger="pisf")
    sock = socket.create_connection(tuple(instance.address))
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.sendall(payload)
    if how == "reset":   # a reset discards what the server has not read: let it read the scan first
        wait_until(lambda: any("acquisitions received" in r.getMessage() for r in caplog.records),
                   what="the scan read to its CLOSE")
    else:                # a TEXT the server sends at once (header warning) is read: no reset at close
        sock.settimeout(0.5)
        try:
            protocol.MessageReader(protocol.socket_reader(sock)).read()
        except (OSError, protocol.ProtocolError, protocol.PeerClosed):
            pass
    sock.close()
    wait_until(lambda: instance.counters["scans"] == 1, timeout_s=60, what="the scan's end")
    made = instance.counters["images_made"]
    runs, dropped = scheduler.counts.jobs_run - runs, scheduler.counts.jobs_dropped - dropped
    print(f"\n{how}: {made} of 8 images made, {runs} slices through the network, {dropped} dropped from its queue")
    assert instance.counters["scans_cancelled"] == 1
    assert made <= (2 if how == "close" else 1), made
    assert runs <= 1 + ahead and runs < 8, runs
    assert any("stopped early" in r.getMessage() for r in caplog.records)
    assert_still_serving(instance)
