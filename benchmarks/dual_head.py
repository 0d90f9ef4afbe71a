"""The dual-head experiment: does a teacher-token head make a Bicameral byte LM learn faster?

    python -m benchmarks.dual_head --preset smoke     # minutes on 2 CPU cores
    python -m benchmarks.dual_head --preset original  # original sizes (C=512, 6 layers, 1024-byte windows; GPU)

For every corpus and seed, the same backbone (same initial weights, same data order, same schedule, the same
cutoff curriculum rule) is trained twice: as the single-head byte model (no token head) and with the token head at
`token_loss_weight` (0.5, the original's). Both arms supervise the next byte at *every* position (the original compared a
16-position chunk loss with an all-position token loss, which confounds the comparison). The teacher is a byte-level
BPE of `token_vocab_size` tokens fitted offline on the training documents, or, with `--teacher_tokenizer`, any
fast tokenizer (a folder, or a Hub id such as `gpt2` where the Hub is reachable: the original's teacher), whose
vocabulary then sizes the token head.

Reported per arm: steps until the training byte loss (trailing mean over `smooth` steps) first reaches each
threshold, held-out bits per byte at the end, median wall-clock per optimizer step, the cutoff changes, and the
token head's parameters and FLOPs (measured model, and the original's sizes). Writes `dual_head.json` and
`dual_head_curves.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import statistics
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

from .harness import add_deprecated_override, add_preset_argument, add_set_argument, apply_settings, environment, \
    figure_title, format_table, output_folder, pyplot, resolve_device, save_figure, training_arguments, write_json


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M-parameter backbone, 256-byte windows, 300 steps of 8 windows per run, 2 corpora x 2 seeds x 2 arms.
    "smoke": dict(corpora=["tinystories_valid_sample.txt", "tinyshakespeare.txt"], seeds=[0, 1],
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


def summarise(runs: list[dict[str, Any]], settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per corpus and arm: means (and spread over seeds) of the figures; and one verdict line per corpus."""
    rows, verdicts = [], []
    for corpus in settings["corpora"]:
        by_arm = {}
        for arm in ("single_head", "dual_head"):
            chosen = [run for run in runs if run["corpus"] == corpus and run["arm"] == arm]
            bpb = [run["eval_bits_per_byte"] for run in chosen]
            row = {"corpus": corpus, "arm": arm, "seeds": len(chosen),
                   "eval_bpb": statistics.fmean(bpb), "eval_bpb_spread": max(bpb) - min(bpb),
                   "s_per_step": statistics.fmean(run["median_step_seconds"] for run in chosen),
                   "cutoff_changes": [[(c["step"], c["cutoff_to"]) for c in run["cutoff_changes"]] for run in chosen]}
            for threshold in settings["thresholds"]:
                steps = [run["steps_to_threshold"][str(threshold)] for run in chosen]
                row[f"steps_to_{threshold}"] = statistics.fmean(steps) if None not in steps else None
            rows.append(row)
            by_arm[arm] = row
        single, dual = by_arm["single_head"], by_arm["dual_head"]
        speedups = []
        for threshold in settings["thresholds"]:
            a, b = single[f"steps_to_{threshold}"], dual[f"steps_to_{threshold}"]
            speedups.append(f"{threshold}: {a / b:.2f}x" if a and b else f"{threshold}: n/a")
        overhead = dual["s_per_step"] / single["s_per_step"] - 1
        spread = max(single["eval_bpb_spread"], dual["eval_bpb_spread"])
        verdicts.append(
            f"{corpus}: steps single/dual to reach byte loss {'; '.join(speedups)}; held-out bpb single "
            f"{single['eval_bpb']:.4f} vs dual {dual['eval_bpb']:.4f} (dual - single = "
            f"{dual['eval_bpb'] - single['eval_bpb']:+.4f}, seed spread up to {spread:.4f}); the token head costs "
            f"{100 * overhead:+.1f}% wall-clock per step")
    return rows, verdicts


def _meta_parameters(config: BicameralConfig) -> dict[str, int]:
    """`parameter_breakdown` of a model of `config` built without allocating its weights."""
    with torch.device("meta"):
        return parameter_breakdown(BicameralForCausalLM(config))


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    corpora = report["settings"]["corpora"]
    smooth = report["settings"]["smooth"]
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for run in (r for r in report["runs"] if r["corpus"] == corpus):
            color = "C0" if run["arm"] == "single_head" else "C1"
            style = "-" if run["seed"] == report["settings"]["seeds"][0] else "--"
            char = run["char_loss"]
            trailing = [statistics.fmean(char[max(0, i + 1 - smooth):i + 1]) for i in range(len(char))]
            ax.plot(range(1, len(char) + 1), trailing, style, color=color,
                    label=f"{run['arm']} byte loss (seed {run['seed']})")
            if run["arm"] == "dual_head":
                tokens = [t for t in run["token_loss"] if t is not None]
                ax.plot(range(1, len(tokens) + 1), tokens, style, color="C2", alpha=0.5,
                        label=f"dual_head token loss (seed {run['seed']})")
            for change in run["cutoff_changes"]:
                ax.axvline(change["step"], color=color, alpha=0.3, linestyle=":")
        for threshold in report["settings"]["thresholds"]:
            ax.axhline(threshold, color="0.8", linewidth=0.8)
        ax.set_title(f"{corpus} (dotted: cutoff raised)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"training loss (nats; byte loss: trailing mean of {smooth})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(figure_title("dual_head: single vs dual head training loss", report["preset"],
                              report["settings"]["max_steps"], report["environment"]), fontsize=10)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
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

    rows, verdicts = summarise(runs, settings)
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
        "summary": rows,
        "token_head_cost": cost,
        "verdict": verdicts,
    }
    write_json(output_dir / "dual_head.json", report)
    plot(report, output_dir / "dual_head_curves.png")
    columns = [("corpus", "corpus"), ("arm", "arm"), ("eval_bpb", "held-out bpb"), ("eval_bpb_spread", "spread"),
               ("s_per_step", "s/step")] + [(f"steps_to_{t}", f"steps≤{t}") for t in settings["thresholds"]]
    print(format_table(rows, columns))
    for name, entry in cost.items():
        print(f"token head ({name}): {entry['parameters']['token_head']:,} parameters "
              f"({100 * entry['token_head_share_of_parameters']:.1f}% of the model), "
              f"{100 * entry['token_head_share_of_forward_flops']:.1f}% of the forward FLOPs per byte")
    print("\n".join(verdicts))
    print(f"wrote {output_dir}/dual_head.json and dual_head_curves.png")
    return report


if __name__ == "__main__":
    run_cli(main)
