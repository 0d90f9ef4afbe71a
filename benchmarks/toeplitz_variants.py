"""The variants experiment of the Toeplitz mixer: train the 4 variants {mean|nomean}_{proj|noproj}
(or the 8 with the training head schedule), benchmark each one's generation cached / uncached × parallel /
sequential heads, and write the original's results layout.

    python -m benchmarks.toeplitz_variants --preset smoke            # minutes on a 2-core CPU, local corpus
    python -m benchmarks.toeplitz_variants --preset original         # the original's sizes and Trainer arguments (GPU)
    python -m benchmarks.toeplitz_variants --preset original --train_schedules parallel,sequential  # 8 variants
    python -m benchmarks.toeplitz_variants --set model.hidden_size=64,training.max_steps=50,bench.runs=5
    python -m benchmarks.analyze_toeplitz results/<run>              # the verdicts and comparison_plots.png
    python -m benchmarks.toeplitz_variants card model_cards/results/toeplitz_variants/smoke/toeplitz_variants.json

`--set section.field=value` changes a preset field: `model.*` (config fields), `data.*` (validation_file,
tokenizer_name, vocab_size, block_size, max_train_documents), `training.*` (`TrainingArguments` fields), `bench.*`
(batch_size, new_tokens, prompt_lengths, runs, warmup, threads).

Every variant is trained once per seed (`--seeds`; the seed sets the initial weights and the data order, the data
split uses the first). Writes `results/<YYYY-MM-DD_HH-MM-SS>/`: `train_script.py` and `model_snapshot.py` (code
snapshots), `tokenizer/`, `seed<seed>/<variant>/metrics.json` (+ the trained model), `all_results.json` (the list of
the per-(seed, variant) dicts, with the original's keys verbatim and the new figures under `extra`) and
`comparison_plots.png` (first seed), and prints the original's "FINAL RESULTS SUMMARY" and "SPEEDUP ANALYSIS"
tables (first seed); and into `--results_dir` (default: the run folder) the small seed report
`toeplitz_variants.json` (eval loss per variant as mean ± SE over seeds, the ablations' paired differences with
their 2-SE verdicts) and `toeplitz_variants.png`. `card <json>` regenerates the card's section and the figure.

Differences from the original, on purpose (see the model card): EOS targets are kept in the loss (the original's
collator masked them, pad = eos); the benchmark also sweeps prompt lengths (the original timed 1-token prompts only),
reports medians and p10/p90 beside the original's mean, and the cached sequential mode really runs the sequential head
schedule (the original's cached step ignored it); `training_speed_iterations_per_sec` is the real step rate (the
original's was always 0); the run-mean training loss is reported as such beside the last logged one.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

import hf_models  # noqa: F401  (fills the registry)
from hf_models.registry import get_spec
from hf_models.toeplitz_mixer import modeling_toeplitz_mixer
from training.common import UsageError, run_cli
from training.data import DataArguments, default_data_dir, load_documents, tokenize_and_pack
from training.tokenization import load_tokenizer, train_bpe_tokenizer
from training.train import config_for_tokenizer
from training.trainer import resolve_trainer

from .analyze_toeplitz import CARD, analyze, card_block, card_table, plot_comparison, plot_seeds, print_verdicts, \
    seed_report
from .harness import add_deprecated_override, add_deprecated_settings, add_preset_argument, add_set_argument, \
    environment, format_table, parse_set, positive_ints, random_prompts, resolve_device, run_section, time_generation, \
    timestamp, torch_threads, training_arguments, update_card_from_json, write_json

VARIANTS = {
    "mean_proj": dict(do_toep_mean=True, do_toep_proj=True),
    "mean_noproj": dict(do_toep_mean=True, do_toep_proj=False),
    "nomean_proj": dict(do_toep_mean=False, do_toep_proj=True),
    "nomean_noproj": dict(do_toep_mean=False, do_toep_proj=False),
}
DATA_FIELDS = ("validation_file", "tokenizer_name", "vocab_size", "block_size", "max_train_documents")
MODES = {  # the original's four generation modes: (use_cache, parallel_heads)
    "cached_parallel": (True, True),
    "cached_sequential": (True, False),
    "uncached_parallel": (False, True),
    "uncached_sequential": (False, False),
}

IDENTITY_KERNEL_WARNING = (
    "kernel_param='identity' (the original run's raw kernels): the mean normaliser divides by cumulative kernel sums "
    "that cross zero at initialisation (1/|c| up to about 1.8e3 with N(0, 0.2^2) kernels), so the mean variants are "
    "numerically unstable there; kernel_param='softplus' keeps every sum positive")
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=128,
                      max_position_embeddings=256, dropout=0.1, kernel_param="softplus"),
        "data": dict(train_file="tinystories_valid_sample.txt", block_size=128, vocab_size=4096),
        "training": dict(max_steps=400, per_device_train_batch_size=16, per_device_eval_batch_size=32,
                         learning_rate=2e-3, warmup_steps=40, lr_scheduler_type="cosine", eval_strategy="steps",
                         eval_steps=100, save_strategy="no", logging_steps=10, max_grad_norm=1.0),
        # One thread: a tiny model's decode step is latency-bound, and on a shared 2-core machine the small
        # multi-threaded kernels of a step mostly measure OpenMP waiting for a busy core.
        "bench": dict(batch_size=4, new_tokens=64, prompt_lengths=[1, 64, 128], runs=5, warmup=1, threads=1),
        # every variant trained once per seed (initial weights and data order), paired by seed in the verdicts
        "seeds": [42, 43, 44],
    },
    # The code of the published run (2025-10-27_23-07-11): batch 64, 2 epochs, bf16, eval / save every 2,000 /
    # 4,000 steps, best checkpoint by eval loss, identity kernels.
    "original": {
        "model": dict(hidden_size=512, num_hidden_layers=10, num_heads=4, intermediate_size=512,
                      max_position_embeddings=512, dropout=0.1, kernel_param="identity"),
        # the published run's data and tokenizer (a lower-casing WordPiece of 4,096 tokens), both from the Hub
        "data": dict(dataset_name="SimpleStories/SimpleStories", tokenizer_name="SimpleStories/SimpleStories-1.25M",
                     block_size=512, vocab_size=4096),
        "training": dict(num_train_epochs=2, per_device_train_batch_size=64, per_device_eval_batch_size=64,
                         learning_rate=5e-4, warmup_steps=500, lr_scheduler_type="cosine", eval_strategy="steps",
                         eval_steps=2000, save_strategy="steps", save_steps=4000, save_total_limit=2,
                         load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                         max_grad_norm=1.0, logging_steps=500, optim="adamw_torch", bf16="cuda"),
        "bench": dict(batch_size=4, new_tokens=128, prompt_lengths=[1, 128, 384], runs=10, warmup=2, threads=None),
        "seeds": [42],
    },
}
# Wider than smoke (E=160, 4 layers) at smoke's full 400 steps of 16 x 128 tokens (the committed smoke run halved them),
# the same four variants and 3 seeds, decode timed at prompts 1 and 128: 12 runs, 38 minutes measured on one AMD EPYC
# core (the card's medium section).
PRESETS["medium"] = {
    **PRESETS["smoke"],
    "model": {**PRESETS["smoke"]["model"], "hidden_size": 160, "intermediate_size": 160},
    "bench": {**PRESETS["smoke"]["bench"], "prompt_lengths": [1, 128]},
}
# One point at the original's model size on an H200 in about a minute (benchmarks.gpu_campaign; sized by estimate, not
# yet measured on a GPU): the original's 10-layer 512-wide model, the local corpus with a BPE of 4,096, steps of
# 32 x 512 tokens in bf16 (150 steps), a shorter decode sweep.
PRESETS["gpu"] = {
    "model": PRESETS["original"]["model"],
    "data": dict(train_file="tinystories_valid_sample.txt", block_size=512, vocab_size=4096),
    "training": dict(max_steps=150, per_device_train_batch_size=32, per_device_eval_batch_size=32,
                     learning_rate=1e-3, warmup_steps=20, lr_scheduler_type="cosine", eval_strategy="steps",
                     eval_steps=150, save_strategy="no", logging_steps=15, max_grad_norm=1.0, bf16="cuda"),
    "bench": dict(batch_size=4, new_tokens=32, prompt_lengths=[1, 256], runs=5, warmup=1, threads=None),
    "seeds": [42],
}
# The original README's arguments (batch 16, 20k steps, fp16); its save interval 5,000 is not a multiple of the eval
# interval, which `load_best_model_at_end` rejects, so this uses 4,000.
PRESETS["original_readme"] = {
    **PRESETS["original"],
    "training": {**PRESETS["original"]["training"], "num_train_epochs": 1, "max_steps": 20000,
                 "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16, "bf16": False, "fp16": "cuda"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields as section.field (model, data, training, bench; see above)")
    parser.add_argument("--output_root", default="results", help="The run goes to OUTPUT_ROOT/<timestamp>/.")
    parser.add_argument("--results_dir", default=None,
                        help="Where the small seed report (toeplitz_variants.json, .png) goes (default: the run "
                             "folder), e.g. model_cards/results/toeplitz_variants/smoke.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of the 4 variants.")
    parser.add_argument("--train_schedules", default="parallel",
                        help="Head schedules to train each variant with: 'parallel' (4 runs) or "
                             "'parallel,sequential' (the published 8-variant run).")
    parser.add_argument("--train_file", default=None,
                        help="Local corpus (default: the preset's); the preset's Hub data and tokenizer give way.")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset when no --train_file (original presets).")
    add_deprecated_override(parser, "--config_overrides", prefix="model.")
    add_deprecated_settings(parser, {
        "kernel_param": str, "validation_file": str, "tokenizer_name": str, "vocab_size": int, "block_size": int,
        "max_train_documents": int, "max_steps": int, "eval_steps": int, "bench_batch_size": int,
        "bench_new_tokens": int, "bench_prompt_lengths": positive_ints, "bench_runs": int, "bench_threads": int,
    }, keys={"kernel_param": "model.kernel_param", "max_steps": "training.max_steps",
             "eval_steps": "training.eval_steps", **{name: f"data.{name}" for name in DATA_FIELDS},
             **{f"bench_{name}": f"bench.{name}" for name in ("batch_size", "new_tokens", "prompt_lengths", "runs",
                                                               "threads")}})
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the whole run (default: torch's). On a shared CPU, 1 avoids OpenMP "
                             "threads waiting for a busy core.")
    parser.add_argument("--seeds", type=positive_ints, default=None,
                        help="Comma-separated seeds (default: the preset's); each seeds the initial weights and the "
                             "data order of one training of every variant. The data split uses the first.")
    parser.add_argument("--device", default="auto")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with the command line's overrides applied."""
    preset = PRESETS[args.preset]
    cuda = resolve_device(args.device).type == "cuda"
    sections = {name: dict(preset[name]) for name in ("model", "data", "training", "bench")}
    overrides: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in parse_set(args.set).items():
        section, dot, field = key.partition(".")
        if not dot or section not in sections or not field:
            raise UsageError(f"--set {key}: expected section.field, the section one of {', '.join(sections)} "
                             "(e.g. model.hidden_size=256)")
        known = {"data": DATA_FIELDS, "bench": tuple(preset["bench"])}.get(section)
        if known is not None and field not in known:
            raise UsageError(f"--set {key}: unknown {section} field; known: {', '.join(known)}")
        overrides[section][field] = value
    model = {**sections["model"], **overrides["model"]}
    data = sections["data"]
    if args.train_file:  # a local corpus: the preset's Hub data and Hub tokenizer give way (a BPE is trained)
        data.pop("dataset_name", None)
        data.pop("tokenizer_name", None)
        data["train_file"] = args.train_file
    elif "train_file" in data:
        data["train_file"] = str(default_data_dir() / data["train_file"])
    if args.dataset_name:
        data.pop("train_file", None)
        data["dataset_name"] = args.dataset_name
    data.update(overrides["data"])
    training = {key: (cuda if value == "cuda" else value)
                for key, value in {**sections["training"], **overrides["training"]}.items()}
    bench = {**sections["bench"], **overrides["bench"]}
    for key in ("batch_size", "new_tokens", "runs", "threads"):
        if bench.get(key) is not None and bench[key] < 1:
            raise UsageError(f"bench.{key} must be >= 1, got {bench[key]}")
    context = model.get("max_position_embeddings", 512)
    bench["prompt_lengths"] = [p for p in bench["prompt_lengths"] if p + bench["new_tokens"] <= context]
    if not bench["prompt_lengths"]:
        raise UsageError(f"no benchmark prompt length fits with {bench['new_tokens']} new tokens in the context {context}")
    if data["block_size"] > context:
        raise UsageError(f"block_size {data['block_size']} exceeds max_position_embeddings {context}")
    variants = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(variants) - set(VARIANTS))
    schedules = [name for name in args.train_schedules.split(",") if name]
    if unknown or not variants:
        raise UsageError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not schedules or set(schedules) - {"parallel", "sequential"}:
        raise UsageError(f"--train_schedules takes 'parallel' and/or 'sequential', got '{args.train_schedules}'")
    if model.get("kernel_param") == "identity":
        warnings.warn(IDENTITY_KERNEL_WARNING, stacklevel=2)
    return {"preset": args.preset, "overrides": parse_set(args.set), "model": model, "data": data, "training": training, "bench": bench,
            "variants": variants, "schedules": schedules, "seeds": args.seeds or preset["seeds"],
            "device": args.device}


def benchmark_generation(model, settings: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """Time the 4 modes at every prompt length of the sweep; the first prompt length gives the original's figures."""
    bench = settings["bench"]
    model.to(device).eval()
    low = 0 if model.config.vocab_size <= 8 else 3  # skip the special tokens
    generation, sweep = {}, []
    with torch_threads(bench.get("threads")):
        env = environment(device, torch.float32)
        for prompt in bench["prompt_lengths"]:
            sweep.append(_benchmark_prompt(model, prompt, bench, generation, device, seed, low))
    speedups = {
        "cache_speedup_parallel": generation["cached_parallel"]["tokens_per_second"]
        / generation["uncached_parallel"]["tokens_per_second"],
        "cache_speedup_sequential": generation["cached_sequential"]["tokens_per_second"]
        / generation["uncached_sequential"]["tokens_per_second"],
        "parallel_speedup_cached": generation["cached_parallel"]["tokens_per_second"]
        / generation["cached_sequential"]["tokens_per_second"],
        "parallel_speedup_uncached": generation["uncached_parallel"]["tokens_per_second"]
        / generation["uncached_sequential"]["tokens_per_second"],
    }
    return {"generation": generation, "speedups": speedups, "sweep": sweep, "environment": env}


def _benchmark_prompt(model, prompt: int, bench: dict[str, Any], generation: dict[str, Any], device: torch.device,
                      seed: int, low: int) -> dict[str, Any]:
    """The 4 modes at one prompt length; at the sweep's first length also the original's `generation` entries."""
    batch, new_tokens, runs = bench["batch_size"], bench["new_tokens"], bench["runs"]
    input_ids = random_prompts(model.config.vocab_size, batch, prompt, device=device, seed=seed, low=low)
    row: dict[str, Any] = {"prompt_length": prompt, "batch_size": batch, "new_tokens": new_tokens}
    for mode, (use_cache, parallel) in MODES.items():
        result = time_generation(model, input_ids, new_tokens=new_tokens, use_cache=use_cache,
                                 mode_kwargs={"parallel_heads": parallel}, warmup=bench["warmup"], runs=runs)
        row[mode] = {"tokens_per_second_median": result["tokens_per_second"],
                     "tokens_per_second_mean_time": batch * new_tokens / result["mean_s"],
                     "ms_per_step_median": result["ms_per_token"],
                     **{key: result[key] for key in ("median_s", "mean_s", "p10_s", "p90_s", "runs")}}
        if prompt == bench["prompt_lengths"][0]:
            generation[mode] = {
                "parallel": parallel, "use_cache": use_cache, "avg_time_seconds": result["mean_s"],
                "tokens_per_second": batch * new_tokens / result["mean_s"], "num_tokens": new_tokens,
                "batch_size": batch, "num_runs": runs,
            }
    row["cache_speedup_parallel"] = (row["cached_parallel"]["tokens_per_second_median"]
                                     / row["uncached_parallel"]["tokens_per_second_median"])
    return row


def train_variant(name: str, flags: dict[str, bool], parallel: bool, settings: dict[str, Any], seed: int, tokenizer,
                  blocks: dict[str, Any], documents, run_dir: Path) -> dict[str, Any]:
    """Train one variant with `seed`, evaluate it, benchmark it and write its `seed<seed>/<name>/metrics.json`."""
    spec = get_spec("toeplitz_mixer")
    device = resolve_device(settings["device"])
    variant_dir = run_dir / f"seed{seed}" / name
    set_seed(seed)  # the original's initialisation was unseeded
    config = config_for_tokenizer(spec, tokenizer, {**settings["model"], **flags, "parallel_heads": parallel})
    model = spec.model_class(config)
    args = training_arguments(variant_dir, device=device, seed=seed,
                              dataloader_pin_memory=device.type == "cuda", **settings["training"])
    trainer = resolve_trainer(spec).from_cli(
        model=model, args=args, tokenizer=tokenizer, train_dataset=blocks["train"],
        eval_dataset=blocks["validation"], objective_args={}, train_texts=documents["train"],
    )
    start = time.perf_counter()
    result = trainer.train()
    wallclock = time.perf_counter() - start
    evaluation = trainer.evaluate()
    model = trainer.model
    model.config.use_cache = True
    trainer.save_model(str(variant_dir))
    (variant_dir / "training_args.bin").unlink(missing_ok=True)
    last_logged = next((entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None)
    bench = benchmark_generation(model, settings, device, seed)
    metrics = {
        "model_name": name,
        "seed": seed,
        "config": {**flags, "parallel_mixer": parallel},
        "training": {
            "train_loss": result.training_loss,
            "eval_loss": evaluation["eval_loss"],
            "train_runtime": result.metrics["train_runtime"],
            "train_samples_per_second": result.metrics["train_samples_per_second"],
            "training_wallclock_time": wallclock,
            "training_speed_iterations_per_sec": trainer.state.global_step / result.metrics["train_runtime"],
        },
        "generation": bench["generation"],
        "speedups": bench["speedups"],
        "extra": {
            "train_loss_note": "train_loss is the mean training loss over the whole run (the original's key and "
                               "meaning); train_loss_last_logged is the last logged one",
            "train_loss_last_logged": last_logged,
            "eval_perplexity": math.exp(min(evaluation["eval_loss"], 50.0)),
            "preset": settings["preset"],
            "optimizer_steps": trainer.state.global_step,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "model_config": config.to_diff_dict(),
            "generation_note": "generation.* are the original's figures (mean time, first prompt length); the sweep has "
                               "medians and p10/p90 at every prompt length; prompts are seeded random token ids",
            "generation_sweep": bench["sweep"],
            "log_history": trainer.state.log_history,
            "environment": bench["environment"],
        },
    }
    write_json(variant_dir / "metrics.json", metrics)
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics


def print_variant(metrics: dict[str, Any]) -> None:
    generation, speedups = metrics["generation"], metrics["speedups"]
    print(f"\n=== {metrics['model_name']} ===  eval loss {metrics['training']['eval_loss']:.4f}")
    print("  " + ", ".join(f"{mode} {generation[mode]['tokens_per_second']:.1f} tok/s" for mode in MODES))
    print("  " + ", ".join(f"{key} {value:.2f}×" for key, value in speedups.items()))


def print_summary(results: list[dict[str, Any]]) -> None:
    rows = [{
        "model": r["model_name"], "eval": r["training"]["eval_loss"],
        "cp": r["generation"]["cached_parallel"]["tokens_per_second"],
        "cs": r["generation"]["cached_sequential"]["tokens_per_second"],
        "up": r["generation"]["uncached_parallel"]["tokens_per_second"],
        **r["speedups"],
    } for r in results]
    print("\n" + "=" * 80 + "\nFINAL RESULTS SUMMARY\n" + "=" * 80)
    print(format_table(rows, [("model", "Model"), ("eval", "Eval Loss"), ("cp", "Cached+Par"), ("cs", "Cached+Seq"),
                              ("up", "Uncached+Par"), ("cache_speedup_parallel", "Cache Speedup")]))
    print("\n" + "=" * 80 + "\nSPEEDUP ANALYSIS\n" + "=" * 80)
    print(format_table(rows, [("model", "Model"), ("cache_speedup_parallel", "Cache (par)"),
                              ("cache_speedup_sequential", "Cache (seq)"),
                              ("parallel_speedup_cached", "Parallel (cached)"),
                              ("parallel_speedup_uncached", "Parallel (uncached)")]))
    sweep_rows = [{"model": r["model_name"], "prompt": row["prompt_length"],
                   **{mode: row[mode]["tokens_per_second_median"] for mode in MODES},
                   "cache ×": row["cache_speedup_parallel"]}
                  for r in results for row in r["extra"]["generation_sweep"]]
    print("\nPROMPT-LENGTH SWEEP (median tok/s)")
    print(format_table(sweep_rows, [("model", "Model"), ("prompt", "Prompt"), *((m, m) for m in MODES),
                                    ("cache ×", "Cache × (par)")]))


def main(argv: Sequence[str] | None = None) -> Path | None:
    """Run the experiment and return the run folder; or, as `card <json>`, regenerate the card's section and the
    figure from a committed seed report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["card"]:
        json_path = Path(argv[1])
        print(update_card_from_json(json_path, run_section("toeplitz_variants", json_path), card_block, card=CARD))
        plot_seeds(json.loads(json_path.read_text(encoding="utf-8")), json_path.with_suffix(".png"))
        return None
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    with torch_threads(args.threads):
        return run(settings, Path(args.output_root) / timestamp(), args.results_dir)


def run(settings: dict[str, Any], run_dir: Path, results_dir: str | Path | None = None) -> Path:
    """The experiment with resolved settings, into `run_dir` (a new folder; the seed report into `results_dir`,
    default `run_dir`); returns `run_dir`."""
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(__file__, run_dir / "train_script.py")
    shutil.copyfile(modeling_toeplitz_mixer.__file__, run_dir / "model_snapshot.py")
    write_json(run_dir / "settings.json", settings)

    data = settings["data"]
    data_args = DataArguments(train_file=data.get("train_file"), validation_file=data.get("validation_file"),
                              dataset_name=data.get("dataset_name", "SimpleStories/SimpleStories"),
                              block_size=data["block_size"], max_train_documents=data.get("max_train_documents"))
    documents = load_documents(data_args, seed=settings["seeds"][0])
    if data.get("tokenizer_name"):
        tokenizer = load_tokenizer(data["tokenizer_name"])
    else:
        tokenizer = train_bpe_tokenizer(documents["train"]["text"], vocab_size=data["vocab_size"])
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    blocks = {name: tokenize_and_pack(documents[name], tokenizer, data["block_size"], split_name=name).blocks
              for name in ("train", "validation")}

    results = []
    runs = list(itertools.product(settings["seeds"], settings["variants"], settings["schedules"]))
    for index, (seed, variant, schedule) in enumerate(runs, start=1):
        name = variant if settings["schedules"] == ["parallel"] else f"{variant}_{schedule}"
        print(f"\n[{index}/{len(runs)}] training {name}, seed {seed} ({settings['preset']} preset)")
        metrics = train_variant(name, VARIANTS[variant], schedule == "parallel", settings, seed, tokenizer, blocks,
                                documents, run_dir)
        print_variant(metrics)
        results.append(metrics)
        # rewritten after every variant, so an interrupted run keeps what it finished
        (run_dir / "all_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")

    first = [r for r in results if r["seed"] == settings["seeds"][0]]
    print_summary(first)
    plot_comparison(first, run_dir / "comparison_plots.png")
    print_verdicts(analyze(first))
    report = seed_report(settings, results, environment(resolve_device(settings["device"]), torch.float32),
                         wall_time_s=time.perf_counter() - start)
    results_dir = Path(results_dir or run_dir)
    write_json(results_dir / "toeplitz_variants.json", report)
    plot_seeds(report, results_dir / "toeplitz_variants.png")
    print("\n" + card_table(report))
    print(f"\nwrote {run_dir}/all_results.json, seed*/*/metrics.json, comparison_plots.png (seed "
          f"{settings['seeds'][0]}) and {results_dir}/toeplitz_variants.json, toeplitz_variants.png")
    return run_dir


if __name__ == "__main__":
    run_cli(main)
