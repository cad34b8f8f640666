"""`pisf bench` end to end on a tiny simulated dataset (zerofill chain only)."""
from __future__ import annotations

import json
import shutil

from tools.bench.server import markdown, percentiles, run_bench, trend


def test_percentiles_and_trend():
    stats = percentiles([1.0, 2.0, 3.0, None, float("nan")])
    assert stats["n"] == 3 and stats["p50"] == 2.0 and stats["max"] == 3.0
    assert percentiles([])["p50"] is None
    flat = trend([10.0] * 20)
    assert flat["flat"] and abs(flat["slope_ms_per_slice"]) < 1e-9
    growing = trend([10.0 + 5 * i for i in range(20)])
    assert not growing["flat"] and growing["slope_ms_per_slice"] > 4


def test_bench_tiny_zerofill(tmp_path):
    has_bart = shutil.which("bart") is not None
    report = run_bench(tmp_path, chains=("zerofill",), slices=2, matrix=64, coils=4, accel=4, acs=12,
                       use_shared=False, bart_slices=1 if has_bart else 0, realtime=True, realtime_slices=3,
                       tr_ms=5.0, soak=4, min_images=2, connections=(3,), after_idle_s=0.2, log=lambda *_: None)

    assert report["hardware"]["cpu_cores"] >= 1 and report["hardware"]["cpu_model"]
    [run] = report["runs"]
    assert run["dataset"] == "simulated" and run["chain"] == "zerofill" and "failure" not in run
    assert run["images"] == 2 and run["replays"] == 1
    for key in ("server_latency_ms", "client_latency_ms"):
        assert run[key]["n"] == 2
        assert 0 < run[key]["p50"] <= run[key]["p95"] < 30_000
    assert run["slices_per_s"] > 0 and run["peak_rss_mib"] > 10
    assert [p["slice"] for p in run["per_image"]] == [0, 1]

    [together] = report["concurrent"]       # three clients at once, each image against one client's
    assert "failure" not in together and together["connections"] == 3
    assert together["images_expected"] == together["images_equal"] == together["images"] == 6
    assert together["peak_rss_mib"] > 10 and together["server_latency_ms"]["n"] == 6
    # the readout is taken (this test does not measure the hand-back: 0.2 s instead of the default 10 s)
    assert together["after_idle_s"] == 0.2 and together["rss_after_idle_mib"] > 10

    rt = report["realtime"]
    [rt_run] = rt["chains"]
    assert "failure" not in rt_run and rt_run["images"] == 3 and rt["scan_s"] > 0
    assert rt_run["realtime_factor"] > 0 and rt_run["trend_server"]["slope_ms_per_slice"] is not None

    [soak] = report["soak"]["chains"]
    assert soak["images"] >= 4 and soak["replays"] == 2 and soak["rss_end_mib"] > 0
    assert soak["growth_percent"] > -50
    for counts in (soak["counts_after_warmup"], soak["counts_end"]):  # server fds and threads from /proc
        assert counts["fds"] > 0 and counts["threads"] >= 1

    if has_bart:
        bart = report["bart"]
        assert bart["slices"] == 1 and bart["acs_lines"] == 12 and bart["ecalib_pics_ms"]["p50"] > 0
        assert bart["ecalib_pics_l2_ms"]["p50"] > 0
        assert all(bart["classical_core_ms"][m]["p50"] > 0 for m in ("sense", "grappa"))
        assert report["bart_by_dataset"]["simulated"] is bart

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["runs"][0]["images"] == 2
    text = (tmp_path / "bench.md").read_text()
    assert "| simulated | zerofill | 2 |" in text and text == markdown(report)
    assert "| zerofill | 3 | 6 / 6 |" in text
    assert ("plot" in report and (tmp_path / "bench.png").stat().st_size > 0) or "plot_skipped" in report


def test_bench_model_growth_fit_recovers_the_exponent_per_model_and_threads():
    from tools.bench.model import growth
    results = [{"model": m, "threads": 1, "slice": f"{n}x{n}x8", "reconstruct_median_s": c * n ** p}
               for m, c, p in (("v2", 1e-6, 2.6), ("v3", 3e-7, 2.1)) for n in (128, 256, 384)]
    fits = growth(results, "reconstruct_median_s")
    assert fits == {"v2 threads 1": 2.6, "v3 threads 1": 2.1}
    assert growth(results[:1], "reconstruct_median_s") == {}      # one size: no fit


def test_bench_refuses_bad_options_before_simulating(capsys, tmp_path):
    """One line `pisf bench: error: what; what to do`, before the minutes of simulation."""
    from tools import cli

    cases = [(["--model", tmp_path / "none.onnx"], f"--model {tmp_path / 'none.onnx'}: no such file; give an ONNX"),
             (["--raw", tmp_path / "none.h5"], f"--raw {tmp_path / 'none.h5'}: no such file; check the path"),
             (["--chains", "zerofill", "nosuch"], "--chains nosuch: no such chain; choose from "),
             (["--connections", "4", "0"], "--connections 0: must be at least 1; see `pisf bench --help`"),
             (["--after-idle", "-1"], "--after-idle -1: must be 0 or more"),
             (["--matrix", "15"], "--matrix 15: must be even and at least 16")]
    for argv, expected in cases:
        out = tmp_path / "bench"
        code = cli.main(["bench", "--out", str(out), *map(str, argv)])
        _, err = capsys.readouterr()
        assert code == 2 and err.splitlines() == [err.splitlines()[0]], err
        assert err.startswith(f"pisf bench: error: {expected}"), err
        assert not out.exists()  # refused before anything was written
