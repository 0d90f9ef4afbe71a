"""The benchmark harness and the generation / throughput CLIs (tiny models: figures are not checked, the
measurement's shape is)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import generation, throughput
from benchmarks.harness import Timing, environment, format_table, time_generation, time_runs
from hf_models.registry import get_spec
from model_cards import BENCHMARK_FILE

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,vocab_size=64,max_position_embeddings=64"


def test_timing_statistics():
    timing = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    summary = timing.summary()
    assert summary["median_s"] == 3.0 and summary["mean_s"] == 3.0 and summary["runs"] == 5
    assert summary["p10_s"] == pytest.approx(1.4) and summary["p90_s"] == pytest.approx(4.6)
    assert (summary["min_s"], summary["max_s"]) == (1.0, 5.0)
    assert summary["spread_p90_p10"] == pytest.approx(4.6 / 1.4) and summary["noisy"] is True
    steady = Timing([1.0, 1.1, 1.05, 1.2, 1.0]).summary()
    assert steady["spread_p90_p10"] < 1.5 and steady["noisy"] is False


def test_time_runs_warms_up_and_requires_five_runs():
    calls = []
    timing = time_runs(lambda: calls.append(1), device=torch.device("cpu"), warmup=2, runs=5)
    assert len(calls) == 7 and len(timing.seconds) == 5
    with pytest.raises(ValueError, match="runs must be >= 5"):
        time_runs(lambda: None, device=torch.device("cpu"), runs=3)


def test_generation_has_a_fixed_length_even_past_eos():
    spec = get_spec("llama")
    torch.manual_seed(0)
    model = spec.model_class(spec.make_config({"eos_token_id": 5}, tiny=True)).eval()
    with torch.no_grad():
        model.lm_head.bias = None
        model.lm_head.weight.zero_()
        model.lm_head.weight[5] = 1.0  # every greedy step emits EOS
    prompt = torch.randint(6, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    result = time_generation(model, prompt, new_tokens=6, use_cache=True, warmup=0, runs=5)
    assert result["runs"] == 5 and result["tokens_per_second"] > 0


def test_environment_records_what_a_figure_depends_on():
    env = environment(torch.device("cpu"), torch.float32)
    assert {"device", "device_name", "dtype", "torch", "transformers", "python", "torch_threads"} <= set(env)
    assert env["dtype"] == "float32"


def test_format_table():
    table = format_table([{"a": 1.23456, "b": None}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["A      B", "-----  -", "1.235  —"]


def test_generation_cli_measures_cached_uncached_and_the_llama_baseline(tmp_path, capsys):
    report = generation.main([
        "--model_type", "llama", "--set", TINY, "--batch_sizes", "1,2", "--prompt_lengths", "1,8",
        "--new_tokens", "4", "--warmup", "0", "--runs", "5", "--output_dir", str(tmp_path),
    ])
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        assert row["cached_tokens_per_second"] > 0 and row["uncached_tokens_per_second"] > 0
        assert row["cached_timing"]["runs"] == 5
        assert row["spread_p90_p10"] >= 1.0 and row["noisy"] in ("", "noisy")
    saved = json.loads((tmp_path / "generation.json").read_text())
    assert saved["environment"]["device"] == "cpu" and saved["settings"]["new_tokens"] == 4
    assert saved["environment"]["load_average"][0] >= 0 and saved["environment"]["torch_threads"] >= 1
    assert (tmp_path / "generation.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "cached tok/s" in out and "max p90/p10" in out


def test_generation_cli_writes_the_figures_into_a_model_folder(tmp_path):
    spec = get_spec("llama")
    model = spec.model_class(spec.make_config(tiny=True))
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("# card\n\n<!-- benchmark:start -->\n<!-- benchmark:end -->\n")
    generation.main(["--model", str(tmp_path / "model"), "--batch_sizes", "1", "--prompt_lengths", "4",
                     "--new_tokens", "3", "--warmup", "0", "--runs", "5", "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "model" / BENCHMARK_FILE).exists()
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Generation speed" in card and "tok/s" in card


def test_throughput_compile_times_both_paths_of_both_models(tmp_path):
    """`--compile` adds a compiled row per model; each zoo row is compared with Llama's eager and best path."""
    report = throughput.main(["--model_type", "toeplitz_mixer", "--set", "hidden_size=16,num_hidden_layers=1,"
                              "num_heads=2,intermediate_size=16,max_position_embeddings=16,vocab_size=64",
                              "--batch_size", "2", "--seq_len", "8", "--compile", "--backend", "eager", "--threads", "1",
                              "--output_dir", str(tmp_path)])
    rows = {(row["model"], row["path"]): row for row in report["rows"]}
    assert set(rows) == {("toeplitz_mixer", "eager"), ("toeplitz_mixer", "compiled"), ("llama (baseline)", "eager"),
                         ("llama (baseline)", "compiled")}
    best = max(rows[("llama (baseline)", path)]["tokens_per_second"] for path in ("eager", "compiled"))
    for path in ("eager", "compiled"):
        row = rows[("toeplitz_mixer", path)]
        assert row["vs_llama_best"] == pytest.approx(row["tokens_per_second"] / best)


def test_throughput_control_is_llama_with_the_zoo_loss_and_the_summary_states_both_ratios(tmp_path, monkeypatch):
    """`--llama_zoo_loss` adds `llama-zoo-loss`: the same Llama (same seed) whose loss goes through the zoo's
    chunked cross-entropy; the card's summary states the subject's best path against both."""
    from hf_models import modeling_zoo_common

    calls = []
    monkeypatch.setattr(throughput, "zoo_causal_lm_loss",
                        lambda *a, **k: calls.append(1) or modeling_zoo_common.zoo_causal_lm_loss(*a, **k))
    report = throughput.main(["--model_type", "toeplitz_mixer", "--set", "hidden_size=16,num_hidden_layers=1,"
                              "num_heads=2,intermediate_size=16,max_position_embeddings=16,vocab_size=64",
                              "--batch_size", "2", "--seq_len", "8", "--threads", "1", "--llama_zoo_loss",
                              "--output_dir", str(tmp_path)])
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"toeplitz_mixer", "llama (baseline)", "llama-zoo-loss"} and len(calls) >= 5
    assert rows["llama-zoo-loss"]["parameters"] == rows["llama (baseline)"]["parameters"]
    summary = throughput.summary_line(report)
    ours, llama, control = (rows[name]["tokens_per_second"] for name in ("toeplitz_mixer", "llama (baseline)",
                                                                         "llama-zoo-loss"))
    assert summary == (f"Best path (eager): {ours / llama:.2f}× Llama's best path, {ours / control:.2f}× "
                       "`llama-zoo-loss`'s best path.")
    assert report["settings"]["llama_zoo_loss"] is True


def test_throughput_cli_takes_the_deprecated_config_overrides_as_set(tmp_path):
    with pytest.warns(FutureWarning, match="--config_overrides is deprecated, use --set"):
        report = throughput.main(["--model_type", "llama", "--config_overrides", TINY, "--batch_size", "2",
                                  "--seq_len", "16", "--warmup", "1", "--runs", "5", "--output_dir", str(tmp_path)])
    assert report["rows"][0]["tokens_per_second"] > 0
    assert json.loads((tmp_path / "throughput.json").read_text())["settings"]["seq_len"] == 16


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model_type", "nope"], "unknown model_type"),
        (["--model_type", "llama", "--set", TINY, "--prompt_lengths", "64"], "exceed the context"),
        (["--model_type", "llama", "--set", TINY, "--runs", "2"], "--runs"),
        (["--model_type", "llama", "--set", TINY, "--new_tokens", "4", "--modes", "warp"], "unknown modes"),
    ],
)
def test_generation_cli_errors(argv, expected, tmp_path):
    from training.common import UsageError

    with pytest.raises(UsageError, match=expected):
        generation.main([*argv, "--output_dir", str(tmp_path)])


TOEPLITZ_TINY = "hidden_size=16,num_hidden_layers=1,num_heads=2,intermediate_size=16,max_position_embeddings=32,vocab_size=64"


def test_decode_floor_bytes_count_weights_and_the_state_a_step_reads():
    from benchmarks.decode import bytes_per_decode_step

    spec = get_spec("toeplitz_mixer")
    torch.manual_seed(0)
    model = spec.model_class(spec.make_config(tiny=True))
    config = model.config
    E, L, S, V = config.hidden_size, config.num_hidden_layers, config.max_position_embeddings, config.vocab_size
    parameters = sum(p.numel() for p in model.parameters())
    # prompt 3, 4 new tokens: the dynamic step reads on average 3 + 4/2 = 5 positions of history
    dynamic = bytes_per_decode_step(model, 2, 3, 4, path="eager")
    assert dynamic == 4 * (parameters - (V - 2) * E + L * 2 * E * 5)  # untied: 2 embedding rows read
    assert bytes_per_decode_step(model, 2, 3, 4, path="compiled") - dynamic == 4 * L * 2 * E * (S - 5)

    llama_spec = get_spec("llama")
    llama = llama_spec.model_class(llama_spec.make_config(tiny=True)).to(torch.bfloat16)
    c = llama.config  # 2 layers, 2 key/value heads of 8 channels, bf16
    weights = 2 * (sum(p.numel() for p in llama.parameters()) - (c.vocab_size - 1) * c.hidden_size)
    assert bytes_per_decode_step(llama, 1, 10, 4, path="eager") == weights + 2 * 2 * 1 * (2 * 8) * 12 * 2
    assert bytes_per_decode_step(llama, 1, 10, 4, path="static") == weights + 2 * 2 * 1 * (2 * 8) * 14 * 2

    bicameral_spec = get_spec("bicameral_lm")
    bicameral = bicameral_spec.model_class(bicameral_spec.make_config(tiny=True))
    b = bicameral.config  # untied byte embedding (3 rows read); the token head is never read when decoding
    head = sum(p.numel() for name, p in bicameral.named_parameters() if name.startswith("token_head"))
    assert head > 0
    unique = sum(p.numel() for p in {id(p): p for p in bicameral.parameters()}.values())
    ring = max(b.kernel_len, b.time_kernel_size)
    state = b.num_hidden_layers * (3 * ring * b.hidden_size + ring + b.time_kernel_size * b.hidden_size)
    for position in (1, 40):  # constant-size state
        assert bytes_per_decode_step(bicameral, 3, position, 4, path="eager",
                                     auxiliary=bicameral_spec.auxiliary_parameters) == 4 * (unique - head - (b.vocab_size - 3) * b.hidden_size + state)


def test_decode_benchmark_reports_every_path_against_the_floor_and_llama(tmp_path):
    from benchmarks import decode

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = decode.main([
            "--model_type", "toeplitz_mixer", "--set", TOEPLITZ_TINY, "--batch_sizes", "2",
            "--prompt_lengths", "4", "--new_tokens", "8", "--runs", "5", "--backend", "eager", "--static",
            "--bandwidth_gbs", "10", "--threads", "1", "--output_dir", str(tmp_path)])
        assert torch.get_num_threads() == 2  # --threads holds for the run only
    finally:
        torch.set_num_threads(before)
    assert report["environment"]["torch_threads"] == 1
    assert json.loads((tmp_path / "decode.json").read_text())["bandwidth_gbs"] == 10
    rows = {row["subject"]: row for row in report["rows"]}
    assert list(rows) == ["toeplitz_mixer eager", "llama eager", "toeplitz_mixer compiled", "llama compiled",
                          "toeplitz_mixer static", "llama static"]
    assert "no library static cache" in rows["toeplitz_mixer static"]["unavailable"]
    for name, row in rows.items():
        if name == "toeplitz_mixer static":
            continue
        assert row["floor_ms"] == pytest.approx(row["bytes_per_step"] / 10e9 * 1000)
        assert row["fraction_of_floor"] == pytest.approx(row["floor_ms"] / row["decode_step_ms"])
        assert row["decode_step_ms"] > 0 and 0 < row["fraction_of_floor"] < 1 and row["tokens_per_second"] > 0
        assert row["vs_llama_best"] > 0
    assert rows["llama eager"]["vs_llama_eager"] == 1
    # the compiled Toeplitz step reads the whole S-slot history, the eager one the positions decoded so far
    assert rows["toeplitz_mixer compiled"]["bytes_per_step"] > rows["toeplitz_mixer eager"]["bytes_per_step"]


def test_the_decode_benchmarks_head_control_is_llama_with_the_few_rows_head_and_stays_out_of_the_summary():
    from benchmarks.decode import LLAMA_FEW_ROWS, FewRowsHead, measure_decode, summary_line

    spec = get_spec("nanohead_gpt")
    rows = measure_decode(spec, spec.make_config(tiny=True), batch_sizes=[2], prompt_lengths=[3], new_tokens=3,
                          device=torch.device("cpu"), dtype=torch.float32, bandwidth_gbs=10, compile=False,
                          llama_few_rows_head=True, warmup=1, runs=5, log=lambda line: None)
    assert [row["subject"] for row in rows] == ["nanohead_gpt eager", "llama eager", f"{LLAMA_FEW_ROWS} eager"]
    control = rows[2]
    assert control["vs_llama_eager"] > 0 and control["bytes_per_step"] == rows[1]["bytes_per_step"]
    head = FewRowsHead(torch.nn.Linear(8, 5))
    x = torch.randn(2, 1, 8)
    assert head.weight is head.linear.weight
    torch.testing.assert_close(head(x), head.linear(x), rtol=1e-5, atol=1e-6)
    report = {"model_type": "nanohead_gpt", "rows": [{**rows[0], "tokens_per_second": 50.0},
                                                     {**rows[1], "tokens_per_second": 100.0},
                                                     {**control, "tokens_per_second": 200.0}]}
    line = summary_line(report)  # the control's rate is neither the architecture's nor Llama's
    assert "nanohead_gpt's best path ÷ Llama's best path: 0.50–0.50" in line
    assert f"÷ `{LLAMA_FEW_ROWS}`'s best path: 0.25–0.25" in line


def test_decode_benchmark_reports_an_architecture_without_a_static_path_as_such(monkeypatch):
    """Bicameral's compiled path is measured; with its cache made non-compileable (as an architecture without a
    shape-static step would be), `generate` decodes eagerly and the compiled rows say so, without figures."""
    from benchmarks.decode import measure_decode
    from hf_models.bicameral.cache_bicameral import BicameralCache

    spec = get_spec("bicameral_lm")

    def measure() -> list[dict]:
        return measure_decode(spec, spec.make_config(tiny=True), batch_sizes=[1], prompt_lengths=[2, 3],
                              new_tokens=3, device=torch.device("cpu"), dtype=torch.float32, bandwidth_gbs=10,
                              backend="eager", baseline=False, warmup=1, runs=5, log=lambda line: None)

    rows = measure()
    assert [(row["path"], row["prompt_length"]) for row in rows] == [("eager", 2), ("compiled", 2), ("eager", 3),
                                                                     ("compiled", 3)]
    assert all(row["tokens_per_second"] > 0 for row in rows)
    monkeypatch.setattr(BicameralCache, "is_compileable", property(lambda self: False))
    rows = measure()
    assert all(row["tokens_per_second"] > 0 for row in rows[::2])
    assert all("no shape-static decode path" in row["unavailable"] and "tokens_per_second" not in row
               for row in rows[1::2])


# ----------------------------------------------------------------------------------------------------------------
# Experiment scaffolding


def test_torch_threads_restores_the_count_even_after_an_exception():
    from benchmarks.harness import torch_threads

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(target):
            assert torch.get_num_threads() == target
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_mean_and_se_against_a_hand_value():
    from benchmarks.harness import mean_and_se

    mean, se = mean_and_se([1.0, 2.0, 3.0, 6.0])  # sample sd sqrt(14/3); se = sd / 2
    assert mean == pytest.approx(3.0) and se == pytest.approx((14 / 3) ** 0.5 / 2)
    assert mean_and_se([5.0]) == (5.0, 0.0)


def test_set_parser_merges_items_and_rejects_a_malformed_one_in_one_line():
    import argparse

    from benchmarks.harness import add_deprecated_override, add_deprecated_settings, add_set_argument, \
        apply_settings
    from training.common import UsageError

    parser = argparse.ArgumentParser()
    add_set_argument(parser)
    add_deprecated_override(parser, "--override")
    add_deprecated_settings(parser, {"max_steps": int})
    defaults = {"max_steps": 10, "seeds": [0], "name": "a"}
    args = parser.parse_args(["--set", "max_steps=3,seeds=[0,1]", "--set", "name=b"])
    assert apply_settings(defaults, args.set) == {"max_steps": 3, "seeds": [0, 1], "name": "b"}
    with pytest.warns(FutureWarning, match="--override is deprecated"):
        args = parser.parse_args(["--override", "max_steps=4"])
    with pytest.warns(FutureWarning, match=r"--max_steps is deprecated, use --set max_steps="):
        args = parser.parse_args(["--max_steps", "5"])
    assert apply_settings(defaults, args.set)["max_steps"] == 5
    with pytest.raises(UsageError) as error:
        apply_settings(defaults, parser.parse_args(["--set", "max_steps=3,seeds"]).set)
    assert str(error.value).count("\n") == 0 and "--set: bad config override 'seeds'" in str(error.value)
    with pytest.raises(UsageError, match=r"unknown preset field\(s\) \['steps'\]"):
        apply_settings(defaults, ["steps=3"])


def test_renamed_preset_keeps_working_with_a_future_warning():
    import argparse

    from benchmarks.harness import add_preset_argument

    parser = argparse.ArgumentParser()
    add_preset_argument(parser, {"smoke": {}, "original": {}})
    assert parser.parse_args([]).preset == "smoke"
    with pytest.warns(FutureWarning, match="--preset seed is deprecated, use --preset original"):
        assert parser.parse_args(["--preset", "seed"]).preset == "original"


def test_save_figure_writes_and_closes(tmp_path):
    from benchmarks.harness import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "sub" / "figure.png")
    assert path.stat().st_size > 0 and not plt.fignum_exists(fig.number)


def test_output_folder_and_training_arguments_defaults(tmp_path):
    import re

    from benchmarks.harness import output_folder, training_arguments

    assert output_folder(str(tmp_path), "x") == tmp_path
    default = output_folder(None, "dual_head", "smoke").as_posix()
    assert re.fullmatch(r"results/dual_head-smoke-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", default)
    args = training_arguments(tmp_path, device=torch.device("cpu"), seed=3, max_steps=2, save_strategy="steps")
    assert (args.use_cpu, args.seed, args.report_to, args.dataloader_pin_memory) == (True, 3, [], False)
    assert args.save_strategy == "steps" and args.max_steps == 2  # the caller's fields win


def test_scaling_benchmark_reports_one_against_two_ranks(stories_file, tmp_path):
    from benchmarks import scaling

    report = scaling.main([
        "--model_type", "toeplitz_mixer", "--train_file", str(stories_file), "--modes", "single,ddp",
        "--set", "hidden_size=32,num_hidden_layers=1,num_heads=2,intermediate_size=32,max_position_embeddings=32",
        "--max_steps", "2", "--per_device_batch_size", "2", "--block_size", "32", "--output_dir", str(tmp_path),
    ])
    rows = {(row["model_type"], row["mode"]): row for row in report["rows"]}
    assert set(rows) == {("toeplitz_mixer", "single"), ("toeplitz_mixer", "ddp"), ("llama", "single"), ("llama", "ddp")}
    assert rows[("toeplitz_mixer", "ddp")]["global_batch"] == 4 and rows[("toeplitz_mixer", "single")]["vs_single"] == 1
    assert all(row["tokens_per_second"] > 0 for row in rows.values())
    assert rows[("llama", "ddp")]["vs_llama_same_mode"] == 1
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["rows"] == report["rows"] and saved["environment"]["torch_threads"] >= 1


@pytest.mark.parametrize("name", ["decode", "throughput"])
def test_every_cards_benchmark_section_is_its_committed_json(name):
    """Each committed `model_cards/results/<benchmark>/<run>/<benchmark>.json` is in its model's card exactly as
    generated (`python -m benchmarks.<benchmark> card <json>`)."""
    import importlib
    from pathlib import Path

    module = importlib.import_module(f"benchmarks.{name}")
    root = Path(__file__).resolve().parents[1]
    reports = sorted((root / "model_cards" / "results" / name).glob(f"*/{name}.json"))
    assert reports, f"no committed {name} results"
    for path in reports:
        report = json.loads(path.read_text())
        block = module.card_block(report, path.relative_to(root).as_posix())
        assert block in (root / "model_cards" / f"{report['model_type']}.md").read_text(), \
            f"regenerate with: python -m benchmarks.{name} card {path.relative_to(root)}"


def _timing(median: float) -> dict:
    return {"median_s": median, "p10_s": 0.9 * median, "p90_s": 1.2 * median, "noisy": False}


def test_timing_plots_carry_error_bars_a_titled_machine_and_a_legend_off_the_data(monkeypatch):
    """The decoding plot draws each series with p10–p90 error bars, names the machine, threads and load in its title,
    and puts its legend below the axes."""
    from matplotlib.container import ErrorbarContainer

    figures = []
    monkeypatch.setattr(generation, "save_figure", lambda fig, path: figures.append(fig))
    rows = [{"batch_size": 1, "prompt_length": length, "model": model, "mode": "default",
             "cached_tokens_per_second": rate, "cached_timing": _timing(8 / rate)}
            for model, rate in (("toeplitz_mixer", 100.0), ("llama", 80.0)) for length in (1, 64)]
    report = {"rows": rows, "model_type": "toeplitz_mixer", "settings": {"new_tokens": 8},
              "environment": {"device_name": "Some CPU", "device": "cpu", "torch_threads": 1,
                              "load_average": [0.5, 0.4, 0.3], "dtype": "float32"}}
    generation.plot(report, "unused.png")
    (fig,) = figures
    assert "Some CPU (cpu), 1 thread(s), load 0.5" in fig._suptitle.get_text()
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one per series
    low, high = bars[0].lines[2][0].get_segments()[0][:, 1]  # the first point's bar: rate·median/p90 .. /p10
    assert low == pytest.approx(100 / 1.2) and high == pytest.approx(100 / 0.9)
    assert ax.get_legend().get_bbox_to_anchor().y0 < ax.get_position().y0 * fig.bbox.height - 1  # below the axes


def test_the_training_loss_curve_has_a_title(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from model_cards import plot_loss_curve

    titles = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.append(fig.axes[0].get_title()) or
                        original(fig, *a, **k))
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    assert plot_loss_curve(history, tmp_path / "curve.png", title="llama: 2 steps on Some CPU")
    assert titles == ["llama: 2 steps on Some CPU"]


def test_environment_records_threads_and_load():
    from benchmarks.harness import environment

    env = environment(torch.device("cpu"), torch.float32)
    assert env["torch_threads"] == torch.get_num_threads() and len(env["load_average"]) == 3
