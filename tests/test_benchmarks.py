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
        "--model_type", "llama", "--config_overrides", TINY, "--batch_sizes", "1,2", "--prompt_lengths", "1,8",
        "--new_tokens", "4", "--warmup", "0", "--runs", "5", "--output_dir", str(tmp_path),
    ])
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        assert row["cached_tokens_per_second"] > 0 and row["uncached_tokens_per_second"] > 0
        assert row["cached_timing"]["runs"] == 5
    saved = json.loads((tmp_path / "generation.json").read_text())
    assert saved["environment"]["device"] == "cpu" and saved["settings"]["new_tokens"] == 4
    assert (tmp_path / "generation.png").stat().st_size > 0
    assert "cached tok/s" in capsys.readouterr().out


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


def test_throughput_cli(tmp_path):
    report = throughput.main(["--model_type", "llama", "--config_overrides", TINY, "--batch_size", "2",
                              "--seq_len", "16", "--warmup", "1", "--runs", "5", "--output_dir", str(tmp_path)])
    assert report["rows"][0]["tokens_per_second"] > 0
    assert json.loads((tmp_path / "throughput.json").read_text())["settings"]["seq_len"] == 16


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model_type", "nope"], "unknown model_type"),
        (["--model_type", "llama", "--config_overrides", TINY, "--prompt_lengths", "64"], "exceed the context"),
        (["--model_type", "llama", "--config_overrides", TINY, "--runs", "2"], "--runs"),
        (["--model_type", "llama", "--config_overrides", TINY, "--new_tokens", "4", "--modes", "warp"], "unknown modes"),
    ],
)
def test_generation_cli_errors(argv, expected, tmp_path):
    from training.common import UsageError

    with pytest.raises(UsageError, match=expected):
        generation.main([*argv, "--output_dir", str(tmp_path)])
