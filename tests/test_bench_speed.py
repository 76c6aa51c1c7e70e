"""``sparse-index bench speed``: tiny CPU runs of the speed benchmark (report, plot, guards, CLI)."""

from __future__ import annotations

import json

import pytest

from sparse_index_jax.bench import speed as bench_speed
from sparse_index_jax.cli import main

TINY = dict(topk=16, heads=4, head_dim=16, hisa_block=16, hisa_blocks=4, misa_block=16, misa_heads=2,
            mla_heads=4, mla_dk=64, mla_v_dim=32, gqa_heads=4, gqa_kv_heads=2, gqa_head_dim=16, decode_batch=2,
            repeats=1, matmul_size=128)
TINY_ARGS = ["--topk", "16", "--heads", "4", "--head-dim", "16", "--hisa-block", "16", "--hisa-blocks", "4",
             "--misa-block", "16", "--misa-heads", "2", "--mla-heads", "4", "--mla-dk", "64", "--mla-v-dim", "32",
             "--decode-batch", "2", "--repeats", "1", "--matmul-size", "128", "--quiet"]


def test_every_entry_runs_and_the_report_is_complete(tmp_path):
    report = bench_speed.run(bench_speed.SpeedSetup(lengths=(128,), **TINY), progress=False)
    json_path, png_path = bench_speed.save(report, tmp_path / "speed.json")
    saved = json.loads(json_path.read_text())
    assert png_path is not None and png_path.exists() and png_path.stat().st_size > 0

    env = saved["environment"]
    assert env["platform"] == "cpu" and env["device_kind"] and env["jax"] and env["jaxlib"] and env["timestamp"]
    assert saved["setup"]["topk"] == 16 and saved["setup"]["lengths"] == [128] and saved["setup"]["repeats"] == 1
    assert saved["setup"]["dtypes"]["q"] == "bfloat16" and saved["setup"]["misa_candidates"] == 64
    assert set(saved["backends"]) == {"dsa_topk", "hisa_topk", "misa_topk", "sparse_mla", "sparse_gqa"}
    assert all(b["reason"] for b in saved["backends"].values())
    assert saved["matmul_peak"]["tflops"] > 0 and saved["flop_convention"]
    assert saved["matmul_peak_fp8"]["dtype"] == "float8_e4m3fn" and saved["matmul_peak_fp8"]["tflops"] > 0

    assert set(saved["results"]) == set(bench_speed.ENTRIES)
    for entry, cells in saved["results"].items():
        cell = cells["128"]
        assert cell["status"] == "ok", (entry, cell)
        assert 0 < cell["min_ms"] <= cell["median_ms"] and cell["compile_ms"] > 0 and cell["shapes"]
        if entry.startswith("key_cache_read"):  # a memory pass: bytes, no FLOPs
            assert cell["bytes"] == 2 * 128 * 16 * (2 if entry == "key_cache_read" else 1) and cell["gb_per_s"] > 0
            continue
        assert cell["flops"] > 0 and cell["tflops"] > 0 and 0 < cell["fraction_of_peak"]
    res = saved["results"]
    assert res["dsa"]["128"]["flops"] == 4 * 16 * 128 * 129  # 2*H*d*T*(T+1)/2
    assert res["dsa"]["128"]["flops_square"] == 2 * 128 * 128 * 4 * 16
    assert res["sparse_mla_fwd_bwd"]["128"]["flops"] == 3.5 * res["sparse_mla"]["128"]["flops"]
    assert res["sparse_gqa"]["128"]["flops"] == 2 * 128 * 4 * 16 * 2 * 16  # 2*Hq*k*2d per query
    assert res["sparse_mla_xla"]["128"]["implementation"] == "xla"
    assert res["hisa"]["128"]["flops"] < res["dsa"]["128"]["flops"]  # 4 blocks of 16 < 128 keys: it prunes

    for name, *_ in bench_speed.SPEEDUPS:
        assert saved["ratios"][name]["128"] > 0
    assert set(saved["ratios"]["fraction_of_matmul_peak"]) == set(bench_speed.ENTRIES)
    assert res["dsa_fp8"]["128"]["fraction_of_peak"] == pytest.approx(
        res["dsa_fp8"]["128"]["tflops"] / saved["matmul_peak_fp8"]["tflops"])
    table = bench_speed.format_table(report)
    assert "speedup dsa_vs_naive_xla" in table and "% of peak hisa" in table


def test_cli_naive_guard_skips_the_oversized_length(tmp_path, capsys):
    # naive_xla needs T*S*H*8 bytes: 131 kB at T = 64, 524 kB at T = 128; the budget (322 kB) lies between.
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--lengths", "64,128", "--entries", "naive_xla,dsa", "--memory-budget-gb", "0.0003",
                 "--out", str(out), *TINY_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "naive_xla" in printed and f"wrote {out}" in printed
    saved = json.loads(out.read_text())
    naive = saved["results"]["naive_xla"]
    assert naive["64"]["status"] == "ok"
    assert naive["128"]["status"] == "oom" and "exceeds the memory budget" in naive["128"]["reason"]
    assert saved["results"]["dsa"]["128"]["status"] == "ok"
    assert list(saved["ratios"]["dsa_vs_naive_xla"]) == ["64"]
    assert out.with_suffix(".png").exists()


def test_errors_and_the_time_budget_skip_entries_without_stopping_the_run(monkeypatch):
    real = bench_speed._prepare

    def failing(entry, setup, inputs):
        if entry == "hisa":
            raise ValueError("hisa_topk: implementation='pallas' cannot serve this call on platform 'cpu'\nmore")
        return real(entry, setup, inputs)

    monkeypatch.setattr(bench_speed, "_prepare", failing)
    report = bench_speed.run(bench_speed.SpeedSetup(lengths=(64,), entries=("dsa", "hisa", "misa"), **TINY),
                             progress=False)
    hisa = report["results"]["hisa"]["64"]
    assert hisa["status"] == "skipped" and "cannot serve this call" in hisa["reason"] and "\n" not in hisa["reason"]
    assert report["results"]["misa"]["64"]["status"] == "ok"
    assert report["ratios"]["hisa_vs_dsa"] == {} and "64" in report["ratios"]["misa_vs_dsa"]

    late = bench_speed.run(bench_speed.SpeedSetup(lengths=(64, 128), entries=("dsa",), max_seconds=0, **TINY),
                           progress=False)
    assert all(c["status"] == "skipped" and "--max-seconds" in c["reason"] for c in late["results"]["dsa"].values())


def test_flop_counts_match_their_formulas():
    T, H, d = 1000, 8, 32
    assert bench_speed.dsa_flops(T, H, d) == sum(2 * H * d * (t + 1) for t in range(T))
    # Every block kept (num_blocks * block >= T): HISA scores every causal token plus the block means.
    assert bench_speed.hisa_flops(T, H, d, 100, 10) == bench_speed.dsa_flops(T, H, d) + sum(
        2 * H * d * (t // 100) for t in range(T))
    # All heads routed: MISA's scan is DSA's, plus the router (block means before t's block, own-block keys to t).
    assert bench_speed.misa_flops(T, H, d, 100, H, None) == bench_speed.dsa_flops(T, H, d) + sum(
        2 * H * d * (t // 100 + t % 100 + 1) for t in range(T))


def test_help_explains_the_benchmark(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "speed", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("naive_xla", "matmul", "compile", "median", "FLOPs", "2*H*d*T*(T+1)/2", "speed_<device-kind>.json",
                   "sparse-index-runs/bench-speed-YYYYMMDD-HHMMSS/",
                   "--max-seconds", "--memory-budget-gb", "--lengths"):
        assert phrase in text, phrase


def test_bad_lengths_and_entries_are_rejected(capsys):
    for bad in (["--lengths", "4K,x"], ["--entries", "dsa,nope"]):
        with pytest.raises(SystemExit) as done:
            main(["bench", "speed", *bad])
        assert done.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_attention_sweep_times_every_tile_candidate_or_says_why_not(monkeypatch):
    """bench/attention_sweep.py on a tiny shape (CPU: the kernels interpret; one candidate, to stay quick): one
    row per configuration, each with a timed forward and forward + backward or a one-line failure."""
    from sparse_index_jax.bench import attention_sweep
    from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes

    monkeypatch.setattr(attention_sweep, "candidate_block_sizes", lambda: [MlaTritonBlockSizes()])
    small = bench_speed.SpeedSetup(topk=16, mla_heads=4, mla_dk=48, mla_v_dim=32)
    report = attention_sweep.run(24, repeats=1, matmul_size=64, setup=small)
    rows = report["candidates"]
    assert len(rows) == 4 and report["shape"]["heads"] == 4
    assert [r["query_chunk"] for r in rows[1:]] == [256, 64, 64] and rows[2]["block_sizes"]["num_stages"] == 2
    assert rows[3]["block_sizes"]["block_h"] == 32
    for row in rows:
        for name in ("forward", "forward_backward"):
            cell = row[name]
            assert ("median_ms" in cell and cell["fraction_of_peak"] > 0) or cell.get("reason"), (row, name)


def _speed_report(platform: str, baseline: bool = True) -> dict:
    """A report as ``run`` writes it, made up: dsa 4x faster than naive_xla, fractions of peak over 1 (as a CPU's
    bf16 matmul gives them), a length where naive_xla ran out of memory."""
    peak = {"n": 512, "dtype": "bfloat16", "median_ms": 1.0, "tflops": 0.1}
    lengths = (1024, 2048)
    results = {e: {str(T): {"status": "ok", "median_ms": 0.5 * T / 1024 * f, "fraction_of_peak": 3.0 / f}
                   for T in lengths} for e, f in (("naive_xla", 4.0), ("dsa", 1.0), ("sparse_mla", 2.0),
                                                  ("dsa_decode", 0.1))}
    results["naive_xla"]["2048"] = {"status": "oom", "reason": "made up"}
    if not baseline:
        del results["naive_xla"]
    return {"environment": {"platform": platform, "device_kind": "made up", "jax": "0"},
            "setup": {"lengths": list(lengths)}, "matmul_peak": peak, "matmul_peak_fp8": peak,
            "results": results, "ratios": bench_speed.ratios(results, peak)}


def test_plot_is_times_and_ratios_with_fractions_of_peak_only_off_cpu(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    figures, real = [], bench_speed.save_figure
    monkeypatch.setattr(bench_speed, "save_figure",
                        lambda fig, path, **kw: figures.append(fig) or real(fig, path, **kw))
    for platform in ("gpu", "cpu"):
        path = bench_speed.plot(_speed_report(platform), tmp_path / f"{platform}.png")
        assert path.is_file() and path.stat().st_size > 0
    (gpu_times, gpu_ratios), (cpu_times, cpu_ratios) = (fig.axes for fig in figures)
    gpu_legend = [t.get_text() for t in gpu_times.get_legend().get_texts()]
    cpu_legend = [t.get_text() for t in cpu_times.get_legend().get_texts()]
    assert "dsa (300% of peak at 2K)" in gpu_legend and "matmul peak measured in this run" in gpu_times.get_title()
    assert cpu_legend == ["naive_xla", "dsa", "sparse_mla", "dsa_decode"]  # no fraction of a CPU "peak"
    assert "no % of peak on CPU" in cpu_times.get_title()
    assert [t.get_text() for t in gpu_ratios.get_legend().get_texts()] == ["dsa vs naive_xla"]
    assert list(gpu_ratios.lines[0].get_ydata()) == [4.0] and "baseline" in gpu_ratios.get_title()
    assert any(t.get_text() == "oom" for t in gpu_times.texts)  # where naive_xla stops, and why
    # no entry with its baseline: the ratio panel says so, still two panels
    bench_speed.plot(_speed_report("gpu", baseline=False), tmp_path / "alone.png")
    assert len(figures[-1].axes) == 2 and "no ratios" in figures[-1].axes[1].texts[0].get_text()
