"""The training CLI end to end on a real corpus (tiny Llama), continuing and resuming, and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import train
from training.data import DataArguments, load_documents, tokenize_and_pack
from training.metrics import exact_bits_per_byte
from training.tokenization import token_byte_lengths
from training.common import run_cli

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2"


def cli_args(stories_file: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_type", "llama", "--config_overrides", TINY, "--train_file", str(stories_file),
        "--max_train_documents", "400", "--vocab_size", "300", "--block_size", "64",
        "--output_dir", str(output_dir), "--max_steps", "12", "--per_device_train_batch_size", "8",
        "--learning_rate", "3e-3", "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true", "--sample_max_new_tokens", "8", "--seed", "0", *extra,
    ]


@pytest.fixture(scope="module")
def trained(stories_file, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("cli") / "llama"
    trainer = train.main(cli_args(stories_file, output_dir))
    return output_dir, trainer


def test_cli_writes_a_complete_hub_ready_folder(trained):
    output_dir, trainer = trained
    names = {path.name for path in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "loss_curve.png", "all_results.json", "trainer_state.json"} <= names
    assert not {name for name in names if name.endswith((".bin", ".pt", ".pth"))}
    metrics = json.loads((output_dir / "all_results.json").read_text())
    assert metrics["eval_loss"] > 0 and metrics["eval_perplexity"] > 1
    assert 0 < metrics["eval_bits_per_byte"] < metrics["eval_bits_per_token"]
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.use_cache is True  # the Trainer turns it off for training; the saved model decodes cached
    assert trainer.state.global_step == 12


def test_held_out_file_is_evaluated_with_the_exact_bits_per_byte(stories_file, shakespeare_file, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(shakespeare_file.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    output_dir = tmp_path / "run"
    args = cli_args(stories_file, output_dir, "--validation_file", str(held_out))
    args[args.index("--max_steps") + 1] = "4"
    train.main(args)
    metrics = json.loads((output_dir / "all_results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    documents = load_documents(DataArguments(train_file=str(stories_file), validation_file=str(held_out)), seed=0)
    validation = tokenize_and_pack(documents["validation"], tokenizer, 64, split_name="validation")
    exact = exact_bits_per_byte(model, validation.blocks, token_bytes=token_byte_lengths(tokenizer), batch_size=8)
    assert metrics["eval_bits_per_byte"] == pytest.approx(exact, rel=1e-5)
    approximate = metrics["eval_loss"] * validation.tokens_per_byte / math.log(2)
    assert abs(metrics["eval_bits_per_byte"] - approximate) > 1e-4, "the approximation, not the exact figure"


def test_model_card_is_filled_from_the_run(trained):
    output_dir, _ = trained
    card = (output_dir / "README.md").read_text()
    metrics = json.loads((output_dir / "all_results.json").read_text())
    assert card.startswith("---\n") and "library_name: transformers" in card and "license:" in card
    assert "tinystories_valid_sample.txt" in card
    assert f"{metrics['eval_loss']:.4g}" in card
    assert "loss_curve.png" in card and "=== sample ===" not in card
    assert "| num_hidden_layers | 2 |" in card
    assert "TokenizersBackend" not in card and "byte-level BPE trained on the training documents, 300 tokens" in card
    assert "| epochs |" in card
    assert "roneneldan/TinyStories" in card.split("---")[1] and "cdla-sharing-1.0" in card  # dataset metadata


def test_continue_from_checkpoint_keeps_weights_and_tokenizer(trained, stories_file, tmp_path):
    output_dir, _ = trained
    before = load_file(output_dir / "model.safetensors")
    args = cli_args(stories_file, tmp_path / "continued", "--model_name_or_path", str(output_dir))
    args[args.index("--model_type") + 1] = "llama"
    args[args.index("--max_steps") + 1] = "1"
    args[args.index("--learning_rate") + 1] = "0"
    trainer = train.main(args)
    after = load_file(tmp_path / "continued" / "model.safetensors")
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    assert len(trainer.processing_class) == 300


def test_npt_converts_the_llama_the_cli_trained(trained, stories_file, tmp_path):
    llama_dir, _ = trained
    args = cli_args(stories_file, tmp_path / "npt", "--model_name_or_path", str(llama_dir))
    args[args.index("--model_type") + 1] = "npt_llama"
    args[args.index("--config_overrides") + 1] = "np_rank=8"
    args[args.index("--max_steps") + 1] = "6"
    trainer = train.main(args)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "npt")
    assert model.config.model_type == "npt_llama"
    assert model.config.npt_layers == [1]  # the default follows the depth: the upper half of 2 layers
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    base = {k: v for k, v in model.state_dict().items() if "np_" not in k and ".modulator" not in k}
    assert set(base) == set(llama.state_dict()), "the converted model keeps every base weight"
    torch.testing.assert_close(base["model.embed_tokens.weight"], llama.state_dict()["model.embed_tokens.weight"])
    metrics = json.loads((tmp_path / "npt" / "all_results.json").read_text())
    llama_metrics = json.loads((llama_dir / "all_results.json").read_text())
    # distilled from the trained base, it stays near the base and below the uniform ln V (measured: 5.28 against
    # the base's 5.22 and ln 300 = 5.70); distilling from a random base stays above ln V
    assert metrics["eval_loss"] < llama_metrics["eval_loss"] + 0.25
    assert metrics["eval_loss"] < math.log(300) - 0.25
    assert trainer.state.global_step == 6
    args[args.index("--output_dir") + 1] = str(tmp_path / "npt-lora")
    with pytest.raises(train.UsageError, match="LoRA adapters do not apply to npt_llama"):
        train.main([*args, "--lora_r", "4"])


def test_lora_fine_tunes_a_cli_checkpoint_and_merges(trained, stories_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    llama_dir, _ = trained
    output_dir = tmp_path / "lora"
    args = cli_args(stories_file, output_dir, "--model_name_or_path", str(llama_dir), "--lora_r", "4",
                    "--merge_lora", "--learning_rate", "3e-2")
    args[args.index("--max_steps") + 1] = "6"
    trainer = train.main(args)
    names = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "merged"} <= names
    assert "model.safetensors" not in names, "only the adapter is saved, not a copy of the base"
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert {name.split(".")[-3] for name in adapter} == {"q_proj", "v_proj"}  # the registry's default targets
    assert "PEFT LoRA r=4" in (output_dir / "README.md").read_text()
    assert trainer.state.global_step == 6

    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        peft_logits = AutoPeftModelForCausalLM.from_pretrained(output_dir).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(output_dir / "merged").eval()(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(llama_dir).eval()(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4), "the adapters changed nothing"
    assert (output_dir / "merged" / "tokenizer.json").exists()
    assert not any(path.name.startswith("adapter") for path in (output_dir / "merged").iterdir())


def test_npt_default_layers_follow_the_depth():
    from hf_models.registry import get_spec

    assert get_spec("npt_llama").make_config({"num_hidden_layers": 2}).npt_layers == [1]
    assert get_spec("npt_llama").make_config({"num_hidden_layers": 6}).npt_layers == [3, 4, 5]


def test_resume_from_checkpoint_reaches_the_same_weights(stories_file, tmp_path):
    constant = ("--lr_scheduler_type", "constant")  # the 3-step run's schedule must match the 6-step run's
    straight = train.main(cli_args(stories_file, tmp_path / "straight", "--max_steps", "6", *constant))
    partial_dir = tmp_path / "partial"
    train.main(cli_args(stories_file, partial_dir, "--max_steps", "3", "--save_strategy", "steps",
                        "--save_steps", "3", *constant))
    resumed = train.main(cli_args(stories_file, tmp_path / "resumed", "--max_steps", "6",
                                  "--resume_from_checkpoint", str(partial_dir / "checkpoint-3"), *constant))
    assert resumed.state.global_step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"--model_type": "transformer_xxl"}, "unknown model_type 'transformer_xxl'"),
        ({"--config_overrides": "hidden_size=abc"}, "hidden_size"),
        ({"--config_overrides": "no_such_field=1"}, "unknown config field"),
        ({"--config_overrides": "no_such_field=1", "--train_file": "missing.txt"}, "unknown config field"),  # first
        ({"--train_file": "missing.txt"}, "data file not found"),
        ({"--train_file": "EMPTY"}, "holds no text"),
        ({"--block_size": "100000"}, "--block_size"),
        ({"--train_file": "SHORT"}, "fewer than one block of --block_size 64"),
        ({"--train_file": "BAD.jsonl"}, "line 2 is not valid JSON"),
        ({"--model_name_or_path": "NOWEIGHTS"}, "has no weights"),
        ({"--resume_from_checkpoint": "missing_checkpoint"}, "no such checkpoint folder"),
        ({"--objective_args": "alpha"}, "objective argument"),
        ({"--model_type": "npt_llama"}, "--model_name_or_path"),
        ({"--merge_lora": "true"}, "--lora_r"),  # NPT converts a base, never trains from random
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output_folder(change, expected, stories_file, tmp_path, capsys):
    args = cli_args(stories_file, tmp_path / "out")
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "SHORT").write_text("Once upon a time there was a cat.\n\nThe end.\n")
    (tmp_path / "BAD.jsonl").write_text('{"text": "A story."}\n{"text": "broken\n')
    (tmp_path / "NOWEIGHTS").mkdir()
    for flag, value in change.items():
        local = ("EMPTY", "SHORT", "BAD.jsonl", "NOWEIGHTS", "missing.txt", "missing_checkpoint")
        value = str(tmp_path / value) if value in local else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    stderr = [line for line in err.strip().splitlines() if not line.startswith("Tokenizing")]  # progress bars
    assert len(stderr) == 1 and stderr[0].startswith("error: "), stderr
    assert expected in stderr[0], stderr[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_folder_is_refused_unless_overwritten(stories_file, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "benchmark.json").write_text("{}")  # e.g. the figures of an earlier model
    with pytest.raises(SystemExit):
        run_cli(train.main, cli_args(stories_file, output_dir))
    assert "is not empty" in capsys.readouterr().err
    train.main(cli_args(stories_file, output_dir, "--max_steps", "2", "--overwrite_output_dir"))
    assert (output_dir / "model.safetensors").is_file()
    assert not (output_dir / "benchmark.json").exists()  # the new card cannot show the old model's figures


def test_help_prints_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--overwrite_output_dir" in out and "--lora_r" in out
    from hf_models.registry import all_specs

    for spec in all_specs():  # --model_type's help lists the architectures
        assert spec.model_type in out


def test_the_hub_clients_retry_warnings_are_silenced_for_the_one_line_error():
    import logging

    from training.common import HUB_RETRY_LOGGER

    logger = logging.getLogger(HUB_RETRY_LOGGER)
    previous = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        with pytest.raises(SystemExit):
            run_cli(lambda argv: (_ for _ in ()).throw(train.UsageError("could not load")), [])
        assert not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(previous)


def test_entry_point_without_data_offline_names_train_file(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--train_file" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
