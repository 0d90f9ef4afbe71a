"""The dual-head experiment: does a teacher-token head make a Bicameral byte LM learn faster?

    python -m benchmarks.dual_head --preset smoke     # minutes on 2 CPU cores
    python -m benchmarks.dual_head --preset original  # original sizes (C=512, 6 layers, 1024-byte windows; GPU)
    python -m benchmarks.dual_head card model_cards/results/dual_head/smoke/dual_head.json  # the card's section

For every corpus and seed, the same backbone (same initial weights, same data order, same schedule, the same
cutoff curriculum rule) is trained twice: as the single-head byte model (no token head) and with the token head at
`token_loss_weight` (0.5, the original's). Both arms supervise the next byte at *every* position (the original compared a
16-position chunk loss with an all-position token loss, which confounds the comparison). The teacher is a byte-level
BPE of `token_vocab_size` tokens fitted offline on the training documents, or, with `--teacher_tokenizer`, any
fast tokenizer (a folder, or a Hub id such as `gpt2` where the Hub is reachable: the original's teacher), whose
vocabulary then sizes the token head.

Reported per run: steps until the training byte loss (trailing mean over `smooth` steps) first reaches each
threshold, held-out bits per byte at the end, median wall-clock per optimizer step, the cutoff changes; per corpus and
arm their mean ± standard error over seeds; per corpus the paired (by seed) difference dual − single of held-out
bits per byte with its SE and whether it exceeds 2 SE, and the step ratios single ÷ dual; and the token head's
parameters and FLOPs (measured model, and the original's sizes). Writes `dual_head.json` and `dual_head_curves.png`
to `--output_dir`; `card <json>` re-summarises a report, re-plots it and regenerates the card's section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PrinterCallback, TrainerCallback

import hf_models
from hf_models.bicameral import BicameralConfig, BicameralForCausalLM
from hf_models.bicameral.modeling_bicameral import estimate_flops_per_byte, parameter_breakdown
from training.common import UsageError, run_cli
from training.data import DataArguments, default_data_dir, load_documents, tokenize_and_pack
from training.dual_head import CutoffCurriculum, DualHeadTrainer, add_token_labels, check_teacher, \
    curriculum_stages, fit_teacher_tokenizer
from training.tokenization import load_tokenizer
from training.train import language_model_metrics

from .harness import MODEL_CARDS, add_deprecated_override, add_preset_argument, add_set_argument, apply_settings, \
    card_markers, environment, figure_title, mean_and_se, output_folder, pyplot, resolve_device, run_section, \
    save_figure, training_arguments, update_card_from_json, write_json
from .seed_stats import mean_se, paired_difference, plus_minus


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M-parameter backbone, 256-byte windows, 300 steps of 8 windows per run, 2 corpora x 3 seeds x 2 arms.
    "smoke": dict(corpora=["tinystories_valid_sample.txt", "tinyshakespeare.txt"], seeds=[0, 1, 2],
                  hidden_size=128, num_hidden_layers=2, max_position_embeddings=256, kernel_len=64,
                  transition_bins=8, cutoff=32, cutoff_schedule=[128], token_vocab_size=1024,
                  token_loss_weight=0.5, dropout=0.0, block_size=256, batch_size=8, gradient_accumulation_steps=1,
                  max_steps=300, learning_rate=3e-3, warmup_ratio=0.05, weight_decay=0.0, plateau_window=10,
                  plateau_patience=50, plateau_threshold=0.01, lr_on_raise="halve", max_train_documents=None,
                  max_eval_blocks=64, thresholds=[2.4, 2.0, 1.8, 1.6], smooth=10),
    # The original code's sizes and recipe (C=512, 6 layers, T=1024, K=128, cutoff 128 -> 512 -> all on 1025 bins, batch 4 x 8,
    # AdamW 2e-4, wd 5e-4, dropout 0.1); an offline BPE teacher of 8192 tokens stands in for GPT-2's 50257.
    "original": dict(corpora=["tinystories_valid_sample.txt", "tinyshakespeare.txt"], seeds=[0, 1],
                 hidden_size=512, num_hidden_layers=6, max_position_embeddings=1024, kernel_len=128,
                 transition_bins=32, cutoff=128, cutoff_schedule=[512], token_vocab_size=8192,
                 token_loss_weight=0.5, dropout=0.1, block_size=1024, batch_size=4, gradient_accumulation_steps=8,
                 max_steps=2000, learning_rate=2e-4, warmup_ratio=0.0, weight_decay=5e-4, plateau_window=10,
                 plateau_patience=50, plateau_threshold=0.01, lr_on_raise="halve", max_train_documents=None,
                 max_eval_blocks=256, thresholds=[3.0, 2.5, 2.0, 1.5], smooth=10),
}
# Bigger and longer than smoke (C=160, 3 layers, 500 steps of 8 x 256 bytes; ~1.3M parameters with the heads), both
# corpora, 3 seeds, both arms: 12 runs, 25 minutes measured on one AMD EPYC core (the card's medium section). The local corpora (0.8 and 1.1 MB)
# and the CPU, not the method, cap the scale.
PRESETS["medium"] = {**PRESETS["smoke"], "hidden_size": 160, "num_hidden_layers": 3, "max_steps": 500,
                     "learning_rate": 2e-3}
# One point at the original's model size on an H200 in about a minute (benchmarks.gpu_campaign; sized by estimate, not
# yet measured on a GPU): one corpus and seed, 250 steps of 16 windows of 1024 bytes, no accumulation.
PRESETS["gpu"] = {**PRESETS["original"], "corpora": ["tinystories_valid_sample.txt"], "seeds": [0], "batch_size": 16,
                  "gradient_accumulation_steps": 1, "max_steps": 250, "learning_rate": 1e-3, "warmup_ratio": 0.05,
                  "max_eval_blocks": 128}
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "max_position_embeddings", "kernel_len", "transition_bins",
                 "cutoff", "token_vocab_size", "token_loss_weight", "dropout")


class StepClock(TrainerCallback):
    """Wall-clock seconds of every optimizer step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields, e.g. --set max_steps=100,seeds=[0],corpora=[tinyshakespeare.txt]")
    add_deprecated_override(parser, "--override")
    parser.add_argument("--data_dir", default=None, help="Folder of the corpora (default: $HF_ZOO_DATA).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output_dir", default=None, help="Default: results/dual_head-<preset>-<timestamp>.")
    parser.add_argument("--teacher_tokenizer", default=None,
                        help="Teacher: a fast tokenizer folder or Hub id (e.g. gpt2); default: a BPE fitted per corpus.")
    return parser


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    settings = apply_settings(PRESETS[args.preset], args.set)
    if isinstance(settings["corpora"], str):  # '[a.txt,b.txt]' is not JSON: split it by hand
        settings["corpora"] = [name.strip() for name in settings["corpora"].strip("[]").split(",") if name.strip()]
    if not settings["seeds"] or settings["max_steps"] < 1:
        raise UsageError("seeds must be a non-empty list and max_steps >= 1")
    return settings


def steps_to_thresholds(losses: Sequence[float], thresholds: Sequence[float], smooth: int) -> dict[str, int | None]:
    """First optimizer step (1-based) whose trailing mean over `smooth` steps is <= each threshold (None: never)."""
    result: dict[str, int | None] = {}
    for threshold in thresholds:
        result[str(threshold)] = next(
            (step + 1 for step in range(len(losses))
             if statistics.fmean(losses[max(0, step + 1 - smooth):step + 1]) <= threshold), None)
    return result


def prepare_corpus(path: Path, settings: dict[str, Any], byte_tokenizer, teacher=None) -> dict[str, Any]:
    """Documents, packed byte blocks with teacher-token labels, held-out blocks and the teacher (`teacher`, or a
    BPE fitted on the training documents)."""
    documents = load_documents(DataArguments(train_file=str(path), max_train_documents=settings["max_train_documents"]))
    train = tokenize_and_pack(documents["train"], byte_tokenizer, settings["block_size"], split_name="train")
    validation = tokenize_and_pack(documents["validation"], byte_tokenizer, settings["block_size"],
                                   split_name="validation")
    teacher = teacher or fit_teacher_tokenizer(documents["train"]["text"], settings["token_vocab_size"])
    blocks = add_token_labels(train.blocks, documents["train"], teacher, byte_tokenizer)
    held_out = validation.blocks.select(range(min(settings["max_eval_blocks"], len(validation.blocks))))
    return {"train": blocks, "validation": held_out, "validation_split": validation, "teacher": teacher,
            "train_bytes": train.num_bytes}


def train_arm(arm: str, config: BicameralConfig, initial_state: dict[str, torch.Tensor], corpus: dict[str, Any],
              settings: dict[str, Any], seed: int, output_dir: Path, device: torch.device) -> dict[str, Any]:
    """Train one arm from `initial_state` and return its curves and figures."""
    model = BicameralForCausalLM(config)
    missing, unexpected = model.load_state_dict(initial_state, strict=False)
    if any(not name.startswith("token_head") for name in [*missing, *unexpected]):
        raise RuntimeError(f"backbone weights differ between arms: missing {missing}, unexpected {unexpected}")
    curriculum = None
    if config.cutoff is not None:
        curriculum = CutoffCurriculum(
            curriculum_stages(config.cutoff, [c for c in settings["cutoff_schedule"] if c < config.num_freq_bins]),
            window=settings["plateau_window"], patience=settings["plateau_patience"],
            threshold=settings["plateau_threshold"], lr_on_raise=settings["lr_on_raise"])
    clock = StepClock()
    args = training_arguments(
        output_dir / "runs" / f"{arm}-seed{seed}", device=device, seed=seed, max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        learning_rate=settings["learning_rate"], lr_scheduler_type="cosine", warmup_steps=settings["warmup_ratio"],
        weight_decay=settings["weight_decay"], max_grad_norm=1.0, logging_steps=1, disable_tqdm=True,
        per_device_eval_batch_size=settings["batch_size"],
    )
    trainer = DualHeadTrainer(model=model, args=args, train_dataset=corpus["train"], callbacks=[clock],
                              curriculum=curriculum)
    trainer.remove_callback(PrinterCallback)  # one line per run (below) instead of one per step
    result = trainer.train()
    eval_loss = trainer.evaluate(corpus["validation"].remove_columns(
        [c for c in corpus["validation"].column_names if c not in ("input_ids", "labels")]))["eval_loss"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    char = [entry["loss_char"] for entry in logs]
    return {
        "arm": arm,
        "seed": seed,
        "char_loss": char,
        "token_loss": [entry.get("loss_token") for entry in logs],
        "cutoff": [entry["cutoff"] for entry in logs],
        "cutoff_changes": curriculum.changes if curriculum else [],
        "steps_to_threshold": steps_to_thresholds(char, settings["thresholds"], settings["smooth"]),
        "eval_byte_loss": eval_loss,
        "eval_bits_per_byte": language_model_metrics(eval_loss, corpus["validation_split"])["eval_bits_per_byte"],
        "median_step_seconds": statistics.median(clock.seconds[1:] or clock.seconds),
        "train_runtime_s": result.metrics["train_runtime"],
        "parameters": parameter_breakdown(model),
    }


ARMS = ("single_head", "dual_head")
CARD = MODEL_CARDS / "bicameral_lm.md"


def summarise(runs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The seed statistics of the runs.

    Returns:
        `summary`: per corpus and arm, the seeds, held-out bits per byte and median seconds per step as mean ± SE
        over seeds, and per threshold the steps to reach it (mean ± SE; None when a seed never reached it);
        `comparison`: per corpus, the paired difference `dual − single` of held-out bits per byte (paired by
        seed, with its SE and whether it exceeds 2 SE), per threshold the step ratio `single ÷ dual` (mean ± SE of
        the per-seed ratios; None when a seed of either arm never reached it), and the dual arm's wall-clock per
        step over the single arm's (mean ± SE of the per-seed ratios); `verdict`: one line per corpus.
    """
    rows, comparison, verdicts = [], [], []
    for corpus in settings["corpora"]:
        chosen = {arm: {run["seed"]: run for run in runs if run["corpus"] == corpus and run["arm"] == arm}
                  for arm in ARMS}
        for arm in ARMS:
            by_seed = chosen[arm]
            steps = {str(t): [run["steps_to_threshold"][str(t)] for run in by_seed.values()]
                     for t in settings["thresholds"]}
            rows.append({"corpus": corpus, "arm": arm, "seeds": sorted(by_seed),
                         "eval_bpb": mean_se([run["eval_bits_per_byte"] for run in by_seed.values()]),
                         "s_per_step": mean_se([run["median_step_seconds"] for run in by_seed.values()]),
                         "steps_to_threshold": {t: mean_se(v) if None not in v else None for t, v in steps.items()},
                         "cutoff_changes": {seed: [[c["step"], c["cutoff_to"]] for c in run["cutoff_changes"]]
                                            for seed, run in sorted(by_seed.items())}})
        single, dual = chosen["single_head"], chosen["dual_head"]
        seeds = sorted(set(single) & set(dual))
        ratios = {}
        for threshold in map(str, settings["thresholds"]):
            pairs = [(single[s]["steps_to_threshold"][threshold], dual[s]["steps_to_threshold"][threshold])
                     for s in seeds]
            ratios[threshold] = mean_se([a / b for a, b in pairs]) if all(a and b for a, b in pairs) else None
        entry = {
            "corpus": corpus,
            "bpb_dual_minus_single": paired_difference(
                {s: run["eval_bits_per_byte"] for s, run in dual.items()},
                {s: run["eval_bits_per_byte"] for s, run in single.items()}),
            "steps_ratio_single_over_dual": ratios,
            "step_time_dual_over_single": mean_se([dual[s]["median_step_seconds"] / single[s]["median_step_seconds"]
                                                   for s in seeds]),
        }
        comparison.append(entry)
        verdicts.append(corpus_verdict(entry))
    return {"summary": rows, "comparison": comparison, "verdict": verdicts}


def corpus_verdict(entry: dict[str, Any]) -> str:
    """One corpus's verdict, every figure read from its `summarise` comparison entry."""
    difference = entry["bpb_dual_minus_single"]
    reached = {t: r for t, r in entry["steps_ratio_single_over_dual"].items() if r is not None}
    ratios = (", ".join(f"{r['mean']:.2f} at {t}" for t, r in reached.items()) if reached
              else "no threshold reached by every seed")
    return (f"{entry['corpus']}: held-out bits/byte dual − single = {plus_minus(difference, signed=True)} over "
            f"{len(difference['seeds'])} paired seeds ({'beyond' if difference['beyond_2se'] else 'within'} 2 SE: "
            f"{'a measured' if difference['beyond_2se'] else 'no measured'} difference); steps single ÷ dual to "
            f"reach the byte-loss thresholds {ratios} (≥ 2 would be the hoped-for 2× fewer steps); the dual arm's "
            f"wall-clock per step is {entry['step_time_dual_over_single']['mean']:.2f}× the single arm's")


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The card's dual-head section (between `card_markers`), generated from a `dual_head.json` report's runs: the
    setting, the per-arm table (mean ± SE over seeds), the paired comparison per corpus and the verdicts."""
    settings, env = report["settings"], report["environment"]
    stats = summarise(report["runs"], settings)
    thresholds = [str(t) for t in settings["thresholds"]]
    begin, end = card_markers(run_section("dual_head", json_path))
    setting = (
        f"Preset `{report['preset']}`: C={settings['hidden_size']}, {settings['num_hidden_layers']} layers, "
        f"{settings['block_size']}-byte windows, K={settings['kernel_len']}, cutoff {settings['cutoff']} "
        f"(schedule {settings['cutoff_schedule']}, plateau curriculum), teacher of {settings['token_vocab_size']:,} "
        f"tokens ({next(iter(report['teacher'].values()))['source']}), token weight "
        f"{settings['token_loss_weight']} vs no token head; same initial weights and data order per seed; batch "
        f"{settings['batch_size']}, {settings['max_steps']} steps, AdamW {settings['learning_rate']} (cosine, "
        f"{settings['warmup_ratio']:.0%} warm-up); seeds {settings['seeds']} × {len(settings['corpora'])} corpora × "
        f"2 arms = {len(report['runs'])} trainings. Measured on {env['device_name']}, {env['torch_threads']} torch "
        f"thread(s), {env['dtype']}, torch {env['torch']}; {report['wall_time_s'] / 60:.1f} min for the whole "
        f"command.")
    header = ("| corpus | arm | seeds | held-out bits/byte, mean ± SE | ms/step (median per run), mean ± SE | steps to "
              f"train byte loss ≤ {' / '.join(thresholds)} nats, mean ± SE |")
    lines = [header, "|---|---|---|---|---|---|"]
    for row in stats["summary"]:
        steps = " / ".join(plus_minus(row["steps_to_threshold"][t], 1) if row["steps_to_threshold"][t] else "—"
                           for t in thresholds)
        milliseconds = {key: 1000 * row["s_per_step"][key] for key in ("mean", "se")}
        lines.append(f"| {row['corpus']} | {row['arm']} | {len(row['seeds'])} | {plus_minus(row['eval_bpb'])} | "
                     f"{plus_minus(milliseconds, 0)} | {steps} |")
    comparison = [
        "| corpus | bits/byte dual − single (paired by seed), mean ± SE | per seed | beyond 2 SE | steps single ÷ dual "
        f"at {' / '.join(thresholds)} | s/step dual ÷ single |", "|---|---|---|---|---|---|"]
    for entry in stats["comparison"]:
        difference = entry["bpb_dual_minus_single"]
        ratios = " / ".join(plus_minus(r, 2) if r else "—" for r in entry["steps_ratio_single_over_dual"].values())
        comparison.append(
            f"| {entry['corpus']} | {plus_minus(difference, signed=True)} | "
            f"{', '.join(f'{d:+.4f}' for d in difference['differences'])} | "
            f"{'yes' if difference['beyond_2se'] else 'no'} | {ratios} | "
            f"{plus_minus(entry['step_time_dual_over_single'], 2)} |")
    changes = sorted({(row["corpus"], row["arm"]) for row in stats["summary"]
                      if any(row["cutoff_changes"].values())})
    curriculum = ("Cutoff raised (step → new cutoff; the held-out evaluation follows the last step) in: " + "; ".join(
        f"{row['corpus']} {row['arm']} " + ", ".join(
            f"seed {seed}: " + ", ".join(f"step {step} → {cutoff}" for step, cutoff in changes)
            for seed, changes in row["cutoff_changes"].items() if changes)
        for row in stats["summary"] if (row["corpus"], row["arm"]) in changes) + "."
        if changes else f"The curriculum never raised the cutoff in {settings['max_steps']} steps.")
    return "\n\n".join([begin.format(json=json_path), setting, "\n".join(lines),
                         "(— : a seed did not reach the threshold.)", "\n".join(comparison), curriculum,
                         "Verdict (code): " + "; ".join(stats["verdict"]) + ".", end])


def _meta_parameters(config: BicameralConfig) -> dict[str, int]:
    """`parameter_breakdown` of a model of `config` built without allocating its weights."""
    with torch.device("meta"):
        return parameter_breakdown(BicameralForCausalLM(config))


def _band(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and standard error over seeds at every step of equally long curves."""
    stats = [mean_and_se(values) for values in zip(*curves)]
    return [mean for mean, _ in stats], [se for _, se in stats]


def plot(report: dict[str, Any], path: Path) -> None:
    """Per corpus, the training byte loss (trailing mean) and token loss, mean ± SE over seeds per arm; and the
    held-out bits per byte per corpus and arm (each seed, and mean ± SE)."""
    plt = pyplot()
    settings, env = report["settings"], report["environment"]
    corpora, smooth = settings["corpora"], settings["smooth"]
    fig, axes = plt.subplots(1, len(corpora) + 1, figsize=(5.5 * (len(corpora) + 1), 4.4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for arm, color in zip(ARMS, ("C0", "C1")):
            chosen = [r for r in report["runs"] if r["corpus"] == corpus and r["arm"] == arm]
            trailing = [[statistics.fmean(r["char_loss"][max(0, i + 1 - smooth):i + 1])
                         for i in range(len(r["char_loss"]))] for r in chosen]
            curves = [("byte loss", color, trailing)]
            if arm == "dual_head":
                curves.append(("token loss", "C2", [[t for t in r["token_loss"] if t is not None] for r in chosen]))
            for what, shade, values in curves:
                mean, se = _band(values)
                steps = range(1, len(mean) + 1)
                ax.plot(steps, mean, color=shade, label=f"{arm} {what}, mean of {len(chosen)} seeds")
                ax.fill_between(steps, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)],
                                color=shade, alpha=0.25, linewidth=0)
            for change in (c for r in chosen for c in r["cutoff_changes"]):
                ax.axvline(change["step"], color=color, alpha=0.3, linestyle=":")
        for threshold in settings["thresholds"]:
            ax.axhline(threshold, color="0.8", linewidth=0.8)
        ax.set_title(f"{corpus} (band: ± SE over seeds; dotted: cutoff raised)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"training loss (nats; byte loss: trailing mean of {smooth} steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for x, corpus in enumerate(corpora):
        for offset, arm, color in ((-0.15, "single_head", "C0"), (0.15, "dual_head", "C1")):
            bpb = [r["eval_bits_per_byte"] for r in report["runs"] if r["corpus"] == corpus and r["arm"] == arm]
            mean, se = mean_and_se(bpb)
            ax.plot([x + offset] * len(bpb), bpb, "o", color="0.6", markersize=4)
            ax.errorbar(x + offset, mean, yerr=se, fmt="s", color=color, capsize=5,
                        label=f"{arm}, mean ± SE" if x == 0 else None)
    ax.set_xticks(range(len(corpora)), corpora, fontsize=8)
    ax.set_xlabel("corpus (grey: one seed)")
    ax.set_ylabel("held-out bits per byte")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.suptitle(figure_title(f"dual_head: single vs dual head, batch {settings['batch_size']} × "
                              f"{settings['block_size']} bytes, {len(settings['seeds'])} seeds", report["preset"],
                              settings["max_steps"], env), fontsize=10)
    save_figure(fig, path)


def update_card(json_path: str | Path, card: Path = CARD) -> str:
    """Rewrite the JSON's `summary`, `comparison` and `verdict` from its runs (the current `summarise`), re-plot
    `dual_head_curves.png` beside it and regenerate the card's section; returns the section."""
    json_path = Path(json_path)
    report = json.loads(json_path.read_text(encoding="utf-8"))
    report.update(summarise(report["runs"], report["settings"]))
    write_json(json_path, report)
    plot(report, json_path.parent / "dual_head_curves.png")
    return update_card_from_json(json_path, run_section("dual_head", json_path), card_block, card=card)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the experiment and return its report; or, as `card <json>`, re-summarise a committed report, re-plot
    it and regenerate the card's section."""
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["card"]:
        print(update_card(argv[1]))
        return None
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    device = resolve_device(args.device)
    output_dir = output_folder(args.output_dir, "dual_head", args.preset)
    byte_tokenizer = hf_models.ByteTokenizer()
    teacher = None
    if args.teacher_tokenizer:
        teacher = load_tokenizer(args.teacher_tokenizer)
        try:
            check_teacher(teacher)
        except ValueError as error:
            raise UsageError(str(error)) from None
        settings.update(teacher_tokenizer=args.teacher_tokenizer, token_vocab_size=len(teacher))
    config_fields = {name: settings[name] for name in CONFIG_FIELDS}

    runs = []
    jobs = [(corpus, seed) for corpus in settings["corpora"] for seed in settings["seeds"]]
    corpora: dict[str, dict[str, Any]] = {}
    for corpus_name, seed in tqdm(jobs, desc="dual-head experiment", unit="seed"):
        path = data_dir / corpus_name
        if not path.is_file():
            raise UsageError(f"corpus {path} not found (see --data_dir)")
        if corpus_name not in corpora:
            corpora[corpus_name] = prepare_corpus(path, settings, byte_tokenizer, teacher)
        corpus = corpora[corpus_name]
        dual_config = BicameralConfig(**config_fields)
        torch.manual_seed(seed)
        initial_state = {k: v.clone() for k, v in BicameralForCausalLM(dual_config).state_dict().items()}
        for arm, config in (("single_head", BicameralConfig(**{**config_fields, "token_vocab_size": 0})),
                            ("dual_head", dual_config)):
            run = train_arm(arm, config, initial_state, corpus, settings, seed, output_dir, device)
            run["corpus"] = corpus_name
            runs.append(run)
            tqdm.write(f"{corpus_name} seed {seed} {arm}: held-out bpb {run['eval_bits_per_byte']:.4f}, "
                       f"{run['median_step_seconds'] * 1000:.0f} ms/step, steps to thresholds "
                       f"{run['steps_to_threshold']}, cutoff changes "
                       f"{[(c['step'], c['cutoff_to']) for c in run['cutoff_changes']]}")

    measured = BicameralConfig(**config_fields)
    seed_config = BicameralConfig()  # the original's sizes with GPT-2's 50257-token head
    cost = {
        "measured_model": {"parameters": next(r["parameters"] for r in runs if r["arm"] == "dual_head"),
                           "flops_per_byte": estimate_flops_per_byte(measured, settings["block_size"])},
        "seed_sizes_gpt2_head": {
            "parameters": _meta_parameters(seed_config),
            "flops_per_byte": estimate_flops_per_byte(seed_config, 1024)},
    }
    for entry in cost.values():
        flops = entry["flops_per_byte"]
        entry["token_head_share_of_forward_flops"] = flops["token_head_flops_per_byte"] / (
            flops["backbone_flops_per_byte"] + flops["byte_head_flops_per_byte"] + flops["token_head_flops_per_byte"])
        entry["token_head_share_of_parameters"] = entry["parameters"]["token_head"] / entry["parameters"]["total"]
    report = {
        "experiment": "dual_head",
        "preset": args.preset,
        "settings": settings,
        "teacher": {name: {"type": type(c["teacher"]).__name__, "vocab_size": len(c["teacher"]),
                           "source": args.teacher_tokenizer or "BPE fitted on the corpus"}
                    for name, c in corpora.items()},
        "environment": environment(device, torch.float32),
        "runs": runs,
        **summarise(runs, settings),
        "token_head_cost": cost,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(output_dir / "dual_head.json", report)
    plot(report, output_dir / "dual_head_curves.png")
    print(card_block(report, str(output_dir / "dual_head.json")))
    for name, entry in cost.items():
        print(f"token head ({name}): {entry['parameters']['token_head']:,} parameters "
              f"({100 * entry['token_head_share_of_parameters']:.1f}% of the model), "
              f"{100 * entry['token_head_share_of_forward_flops']:.1f}% of the forward FLOPs per byte")
    print(f"wrote {output_dir}/dual_head.json and dual_head_curves.png")
    return report


if __name__ == "__main__":
    run_cli(main)
