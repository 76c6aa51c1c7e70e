"""``sparse-index bench model``: a tiny CPU run of the model-level benchmark, every configuration, through the
command line (compiling is most of its time: one run serves the tests that read its report)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparse_index_jax.bench import model_speed
from sparse_index_jax.cli import main
from sparse_index_jax.layers.indexer import LightningIndexer

T = 256


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """(printed, JSON path, report) of ``sparse-index bench model --preset tiny`` over every configuration."""
    out = tmp_path_factory.mktemp("bench_model") / "model.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["bench", "model", "--preset", "tiny", "--lengths", str(T), "--out", str(out)]) == 0
    return printed.getvalue(), out, json.loads(out.read_text())


def test_every_configuration_runs_and_the_report_is_complete(cli_run):
    printed, out, rep = cli_run
    env, setup = rep["environment"], rep["setup"]
    assert env["platform"] == "cpu" and env["device_kind"] and env["jax"] and env["timestamp"]
    assert setup["preset"] == "tiny" and list(setup["lengths"]) == [T] and setup["layers"] == 4
    assert list(setup["configs"]) == list(model_speed.CONFIGS) and setup["decode_batch"] == 2
    assert setup["repeats"] == 1 and setup["dtypes"]["activations"] == "float32" and setup["model"]["parameters"] > 0
    assert setup["model"]["indexer"] == {"heads": 4, "head_dim": 16, "topk": 32}
    assert setup["model"]["ffn"] == {"kind": "dense", "intermediate_size": 48}
    assert setup["timed"]["attention"].startswith("sparse MLA call alone (dsa's selection")
    assert set(rep["backends"]) == {"dsa_topk", "hisa_topk", "misa_topk", "sparse_mla"}
    assert all(b["name"] == "xla" and b["reason"] for b in rep["backends"].values())
    assert list(rep["results"]) == list(model_speed.CONFIGS)
    for config, res in rep["results"].items():
        assert res["selector"]["method"] == model_speed.METHOD_OF[config] and res["selector"]["topk"] == 32
        for mode in model_speed.MODES:
            cell = res[mode][str(T)]
            assert cell["status"] == "ok", (config, mode, cell)
            assert 0 < cell["min_ms"] <= cell["median_ms"] and cell["compile_ms"] > 0
    for mode in model_speed.MODES:
        comp = rep["components"][mode]
        assert set(comp["selection"]) == {"dsa", "hisa", "misa", "misa_h"}
        for cells in (*comp["selection"].values(), comp["attention"]):
            assert cells[str(T)]["status"] == "ok" and cells[str(T)]["median_ms"] > 0
        speedups = rep["ratios"][f"{mode}_speedup_vs_dsa"]
        assert set(speedups) == set(model_speed.CONFIGS) and speedups["dsa"][str(T)] == 1.0
        assert all(v[str(T)] > 0 for v in speedups.values())
    assert f"wrote {out}" in printed and out.with_suffix(".png").stat().st_size > 0
    for line in ("prefill ms", "decode speedup vs dsa", "prefill % selection / attention / rest",
                 "index_cache_1/4 (FSSS)", "misa_h (FFFF)", "decode selection misa_h", "prefill attention"):
        assert line in printed, line


def test_shares_sum_to_one_and_count_selection_only_on_f_layers(cli_run):
    rep = cli_run[2]
    layers = rep["setup"]["layers"]
    for mode in model_speed.MODES:
        comp = rep["components"][mode]
        for config, res in rep["results"].items():
            sh = rep["shares"][mode][config][str(T)]
            parts = (sh["selection"], sh["attention"], sh["rest"])
            assert all(0 <= p <= 1 for p in parts) and sum(parts) == pytest.approx(1.0), (config, mode, sh)
            one_selection = comp["selection"][model_speed.METHOD_OF[config]][str(T)]["median_ms"]
            assert sh["selection_ms"] == pytest.approx(len(res["indexer_layers"]) * one_selection)
            assert sh["attention_ms"] == pytest.approx(layers * comp["attention"][str(T)]["median_ms"])
            stack = res[mode][str(T)]["median_ms"]
            assert sh["rest_ms"] == pytest.approx(stack - sh["selection_ms"] - sh["attention_ms"])
            assert sh["layer_ms"] == pytest.approx(stack / layers)
    results = rep["results"]  # the F layers as built: the selection time above counted only those
    assert (results["index_cache_1/2"]["pattern"], results["index_cache_1/2"]["indexer_layers"]) == ("FSFS", [0, 2])
    assert (results["index_cache_1/4"]["pattern"], results["index_cache_1/4"]["indexer_layers"]) == ("FSSS", [0])
    for config in ("dsa", "hisa", "misa", "misa_h"):
        assert (results[config]["pattern"], results[config]["indexer_layers"]) == ("FFFF", [0, 1, 2, 3])


def test_a_run_without_dsa_has_no_ratios():
    setup = model_speed.ModelSpeedSetup(preset="tiny", configs=("index_cache_1/4", "dsa", "hisa", "dsa"))
    assert setup.resolved().configs == ("dsa", "index_cache_1/4", "hisa")  # deduplicated, the baseline first
    results = {"hisa": {m: {"256": {"status": "ok", "median_ms": 1.0}} for m in model_speed.MODES}}
    assert model_speed._ratios(results) == {}


def test_plot_is_times_speedups_over_dsa_and_the_selection_share(cli_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rep = cli_run[2]
    figures, real = [], model_speed.save_figure
    monkeypatch.setattr(model_speed, "save_figure",
                        lambda fig, path, **kw: figures.append(fig) or real(fig, path, **kw))
    assert model_speed.plot(rep, tmp_path / "model.png").stat().st_size > 0
    times, speedups, share = figures[0].axes
    configs = len(model_speed.CONFIGS)
    assert len(times.lines) == len(speedups.lines) - 1 == len(share.lines) == 2 * configs  # prefill + decode each
    assert "median ms" in times.get_title() and "speedup over dsa" in speedups.get_title()
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in speedups.lines)  # the baseline's level
    legend = [t.get_text() for t in figures[0].legends[0].get_texts()]
    assert legend == [f"{c} ({rep['results'][c]['pattern']})" for c in model_speed.CONFIGS] + list(model_speed.MODES)
    no_dsa = {**rep, "ratios": {}}  # a run split over processes: no baseline, the panel says so
    model_speed.plot(no_dsa, tmp_path / "no_dsa.png")
    assert "no speedups" in figures[1].axes[1].texts[0].get_text()


def test_layer_shares_take_the_components_sum_when_it_exceeds_the_stack():
    sh = model_speed.layer_shares(10.0, 1.0, 0.5, f_layers=2, layers=4)
    assert (sh["selection"], sh["attention"], sh["rest"]) == pytest.approx((0.2, 0.2, 0.6))
    assert not sh["components_exceed_stack"] and sh["layer_ms"] == 2.5
    sh = model_speed.layer_shares(3.0, 1.0, 0.5, f_layers=2, layers=4)  # 2 + 2 > 3
    assert (sh["selection"], sh["attention"], sh["rest"]) == (0.5, 0.5, 0.0)
    assert sh["components_exceed_stack"] and sh["rest_ms"] == -1.0


def test_index_cache_s_layers_run_no_indexer(monkeypatch):
    """Traced (not compiled): the stack calls exactly one indexer per F layer, in prefill and in decode with caches;
    the MoE FFN variant builds and traces as well."""
    calls = []
    real = LightningIndexer.__call__

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LightningIndexer, "__call__", counting)
    for ffn in ("dense", "moe"):
        setup = model_speed.ModelSpeedSetup(preset="tiny", lengths=(64,), ffn=ffn).resolved()
        cfg = model_speed.model_config(setup)
        assert set(cfg.mlp_layer_types) == {"dense" if ffn == "dense" else "sparse"}
        base = model_speed.build_model(cfg, dtype=model_speed.PRESETS["tiny"].dtype)
        for config, indexers in ([("dsa", 4), ("index_cache_1/2", 2), ("index_cache_1/4", 1)] if ffn == "dense"
                                 else [("index_cache_1/4", 1)]):  # dsa: the count's control
            model = model_speed.with_index_pattern(base, model_speed.pattern_of(config, 4))
            assert model.cfg.index_pattern == model_speed.pattern_of(config, 4)
            assert model.layers[0].self_attn.indexer.wk.kernel[...] is base.layers[0].self_attn.indexer.wk.kernel[...]
            selector = model_speed.selector_of(setup, config)
            caches = model.init_caches(1, 64 + model_speed.CACHE_SLACK, selector)
            assert [c.index_keys is not None for c in caches] == [p == "F" for p in model.cfg.index_pattern]
            graphdef, state = nnx.split(model)
            stack = model_speed.stack_fn(graphdef, selector)
            calls.clear()
            jax.jit(stack).lower(state, jax.ShapeDtypeStruct((1, 64, 64), model.dtype), caches)  # prefill
            assert len(calls) == indexers, (ffn, config)
            if ffn == "dense" and config != "dsa":
                jax.jit(stack).lower(state, jax.ShapeDtypeStruct((2, 1, 64), model.dtype),  # decode with caches
                                     model_speed._repeat(caches, 2))
                assert len(calls) == 2 * indexers, config


def test_bad_input_is_refused_with_the_reason(capsys):
    cases = [(dict(configs=("dsa", "nope")), "unknown configurations ['nope']"),
             (dict(lengths=(16,)), "lengths must be >= topk=32"),
             (dict(layers=6), "index_cache_1/4 needs a layer count divisible by 4"),
             (dict(layers=3, configs=("index_cache_1/2",)), "divisible by 2"),
             (dict(routed_experts=4), "routed_experts applies to ffn='moe'"),
             (dict(repeats=200), "repeats must be <= 127"),
             (dict(ffn="sparse"), "ffn must be one of dense, moe")]
    for fields, message in cases:
        with pytest.raises(ValueError, match="bench model: .*" + message.replace("[", r"\[").replace("]", r"\]")):
            model_speed.ModelSpeedSetup(preset="tiny", **fields)
    with pytest.raises(ValueError, match="unknown preset 'v4'"):
        model_speed.ModelSpeedSetup(preset="v4")
    with pytest.raises(ValueError, match="lengths must be >= topk=2048"):
        model_speed.ModelSpeedSetup(lengths=(1024,))
    with pytest.raises(ValueError, match="n_group"):  # the model config's own check, named
        model_speed.model_config(model_speed.ModelSpeedSetup(preset="tiny", ffn="moe", routed_experts=3).resolved())

    for argv, message in [(["--configs", "dsa,bogus"], "unknown configs ['bogus']"),
                          (["--lengths", "16"], "lengths must be >= topk=32"),
                          (["--layers", "6"], "divisible by 4"),
                          (["--decode-batch", "0"], "--decode-batch must be positive"),
                          (["--preset", "v4"], "invalid choice: 'v4'")]:
        with pytest.raises(SystemExit) as done:
            main(["bench", "model", "--preset", "tiny", *argv])
        assert done.value.code == 2 and message in capsys.readouterr().err, argv


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "model", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for word in ("index_cache_1/4", "FSSS", "--preset", "--decode-batch", "--ffn", "shares", "18432"):
        assert word in text, word


def test_compiler_options_this_xla_does_not_know_are_dropped_and_failures_are_recorded(monkeypatch):
    monkeypatch.setitem(model_speed.PRESETS, "tiny", dataclasses.replace(
        model_speed.PRESETS["tiny"], compiler_options={"xla_no_such_option": 1}))
    bench = model_speed._Run(model_speed.ModelSpeedSetup(preset="tiny", configs=("dsa", "hisa")).resolved(), log=None)
    timing, result = bench.time_call(lambda x: x + 1, lambda: (jnp.ones(3),))
    assert bench.compiler_options is None and timing.median_ms > 0 and float(result[0]) == 2.0

    bench.results["dsa"]["prefill"]["128"] = {"status": "ok", "median_ms": 1.0}
    bench.fail_length(128, MemoryError("out of memory"))  # an error outside the measurements: the rest of T says it
    assert bench.results["dsa"]["prefill"]["128"]["status"] == "ok"
    assert bench.results["hisa"]["decode"]["128"] == {"status": "oom", "reason": "MemoryError: out of memory"}
    assert bench.components["prefill"]["selection"]["hisa"]["128"]["status"] == "oom"


def test_the_time_budget_skips_what_is_left_and_the_table_says_why():
    report = model_speed.run(model_speed.ModelSpeedSetup(preset="tiny", lengths=(64,), configs=("dsa", "misa"),
                                                         max_seconds=1e-9))
    cell = report["results"]["misa"]["decode"]["64"]
    assert cell["status"] == "skipped" and "--max-seconds" in cell["reason"]
    assert report["shares"] == {"prefill": {"dsa": {}, "misa": {}}, "decode": {"dsa": {}, "misa": {}}}
    table = model_speed.format_table(report)
    assert "not timed: dsa prefill at 64: time budget --max-seconds" in table and "skipped" in table
