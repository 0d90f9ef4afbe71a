"""The Nanohead experiment: train Nanohead GPTs at nanohead proportions 0, 0.2, 0.4, 0.6, 0.8 at a
matched parameter budget and compare validation bits per byte.

    python -m benchmarks.nanohead_sweep --preset smoke     # minutes on 2 CPU cores, tinystories sample
    python -m benchmarks.nanohead_sweep --preset original  # the original code's sizes (~50M parameters, GPU)
    python -m benchmarks.nanohead_sweep --set proportions=[0,0.4],seeds=1,max_steps=50   # any setting

Matched budget: equal parameter count. The depth is the one whose aspect-ratio width (`hidden = aspect_ratio *
depth`, as nanochat sizes its models) gives the parameter count nearest the target; the width is then moved in
steps that keep every proportion's head split valid until the count is within a few percent of the target. Since
both kinds of heads keep the same GQA ratio and fill the same width, the proportion does not change the parameter
count (nor the attention's matmul FLOPs), so every proportion trains the very same number of parameters.

Arms (`--set arms=[...]`): `faithful` (the original's attention: QK-norm without a gain, so no logit exceeds
sqrt(d), 1.73 for a 3-dim nanohead) and `logit_scale` (`learnable_logit_scale=True`: a learnable per-head logit scale lifts that
cap). The faithful arm measures nanoheads *under the sharpness cap*; the gap between arms measures the cap itself.

Every proportion is trained with each of `seeds` seeds (the seed-to-seed spread says which differences are
noise); the same BPE tokenizer, data order and schedule are used for all. Writes `nanohead_sweep.json` (runs,
per-proportion summary, verdict) and `nanohead_sweep.png` (bpb vs proportion, annotated) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import set_seed

import hf_models  # noqa: F401  (fills the registry)
from hf_models.nanohead import NanoheadConfig, NanoheadForCausalLM, calculate_nanohead_split
from hf_models.registry import get_spec
from training.common import UsageError, run_cli
from training.metrics import exact_bits_per_byte
from training.tokenization import token_byte_lengths
from training.trainer import resolve_trainer

from .harness import add_deprecated_settings, add_preset_argument, add_set_argument, apply_settings, environment, \
    card_markers, figure_title, format_table, hardware, mean_and_se, output_folder, outside_legend, prepare_corpus, pyplot, \
    resolve_device, run_section, save_figure, training_arguments, update_card_from_json, write_json

PROPORTIONS = (0.0, 0.2, 0.4, 0.6, 0.8)
ARMS = {"faithful": False, "logit_scale": True}  # arm -> `learnable_logit_scale`
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M parameters, 150 steps of 16 x 128 tokens per run, 2 seeds: a few minutes on 2 CPU cores.
    "smoke": dict(target_params=5e5, aspect_ratio=32, head_dim=32, vocab_size=1024, block_size=128, batch_size=16,
                  max_steps=150, learning_rate=3e-3, seeds=2, max_train_documents=None, max_eval_blocks=64,
                  train_file="tinystories_valid_sample.txt"),
    # The original code's sizes: ~50M parameters, aspect ratio 64, head dim 128, vocabulary 32768, sequences of 2048,
    # 500 iterations; 2 seeds. Meant for a GPU and a corpus larger than the local samples (--set train_file=...).
    "original": dict(target_params=50e6, aspect_ratio=64, head_dim=128, vocab_size=32768, block_size=2048,
                 batch_size=16, max_steps=500, learning_rate=1e-3, seeds=2, max_train_documents=None,
                 max_eval_blocks=256, train_file="tinystories_valid_sample.txt"),
}
# ~2M parameters, 400 steps of 16 x 128 tokens (about 3.5 epochs of the TinyStories sample: the local corpora, not
# the CPU, cap the scale), proportions 0 / 0.4 / 0.8, both arms, 3 seeds: 18 runs, about 55 minutes on one CPU core
# (4.7k tokens/s measured at this size).
PRESETS["medium"] = {**PRESETS["smoke"], "target_params": 2e6, "vocab_size": 2048, "max_steps": 400,
                     "learning_rate": 2e-3, "seeds": 3, "proportions": [0.0, 0.4, 0.8]}
# One point at ~20M parameters on an H200 in about a minute (benchmarks.gpu_campaign, with --bf16; sized by
# estimate, not yet measured on a GPU): one seed per proportion, 300 steps of 32 x 512 tokens.
PRESETS["gpu"] = {**PRESETS["original"], "target_params": 20e6, "vocab_size": 8192, "block_size": 512, "batch_size": 32,
                  "max_steps": 300, "seeds": 1, "max_eval_blocks": 128}


def count_parameters(config: NanoheadConfig) -> int:
    """Parameters of a `NanoheadForCausalLM` of `config`, from the head split (no model is built)."""
    split = config.nanohead_split
    hidden = config.hidden_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    attention = hidden * (split.width + 2 * split.kv_width) + split.width * hidden
    mlp = 2 * hidden * config.intermediate_size
    scales = split.num_heads + split.num_nanoheads if config.learnable_logit_scale else 0
    return embeddings + config.num_hidden_layers * (attention + mlp + scales)


def _splits_exist(hidden: int, heads: int, kv_heads: int, nanohead_dim: int, proportions: Iterable[float]) -> bool:
    try:
        for proportion in proportions:
            calculate_nanohead_split(hidden, heads, kv_heads, proportion, nanohead_dim)
    except ValueError:
        return False
    return True


def estimate_config(
    target_params: float,
    *,
    vocab_size: int,
    aspect_ratio: int,
    head_dim: int,
    kv_group: int,
    nanohead_dim: int,
    proportions: Sequence[float],
    mlp_ratio: int = 4,
) -> dict[str, int]:
    """Depth and width of a model of about `target_params` parameters whose head split exists at every proportion.

    1. depth: the original's rule, the depth whose width `aspect_ratio * depth` (MLP `mlp_ratio` times wider) gives
       the count nearest the target;
    2. heads: `round(width / head_dim)`, rounded to a multiple of the GQA group `kv_group`;
    3. width: the multiple of `2 * heads` (so that the plain GPT's head dim is even) nearest the target count
       for which `calculate_nanohead_split` succeeds at every proportion;
    4. MLP width: set so that the count meets the target (the width steps of 3. are coarse for small models).

    Returns the config fields `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`,
    `intermediate_size`.

    Raises:
        ValueError: no width of that depth has a valid split at every proportion.
    """

    def count(depth: int, hidden: int, intermediate: int) -> float:
        # Both kinds keep the GQA ratio and fill the width, so the split does not change the count.
        attention = hidden * hidden * (2 + 2 / kv_group)
        return 2 * vocab_size * hidden + depth * (attention + 2 * hidden * intermediate)

    depth = min(range(1, 257),
                key=lambda d: abs(count(d, aspect_ratio * d, mlp_ratio * aspect_ratio * d) - target_params))
    heads = max(kv_group, round(aspect_ratio * depth / head_dim / kv_group) * kv_group)
    step = 2 * heads
    widths = [h for h in range(step, 4 * aspect_ratio * depth + step, step)
              if _splits_exist(h, heads, heads // kv_group, nanohead_dim, proportions)]
    if not widths:
        raise ValueError(f"no width at depth {depth} with {heads} heads splits at every proportion {list(proportions)}")
    hidden = min(widths, key=lambda h: abs(count(depth, h, mlp_ratio * h) - target_params))
    intermediate = max(1, round((target_params - count(depth, hidden, 0)) / (2 * depth * hidden)))
    return {"hidden_size": hidden, "num_hidden_layers": depth, "num_attention_heads": heads,
            "num_key_value_heads": heads // kv_group, "intermediate_size": intermediate}


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields and proportions (default [0,0.2,0.4,0.6,0.8]), nanohead_dim (3), "
                             "kv_group (query heads per key/value head, 1), arms (from "
                             f"{', '.join(ARMS)}); train_file: a corpus path or a file in $HF_ZOO_DATA")
    add_deprecated_settings(parser, {
        "proportions": _floats, "nanohead_dim": int, "kv_group": int, "seeds": int, "arms": _names,
        "target_params": float, "aspect_ratio": int, "head_dim": int, "vocab_size": int, "block_size": int,
        "batch_size": int, "max_steps": int, "learning_rate": float, "max_train_documents": int,
        "max_eval_blocks": int, "train_file": str})
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="Train under bf16 autocast (GPU).")
    parser.add_argument("--output_dir", default=None, help="Default: results/nanohead_sweep-<preset>-<timestamp>.")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = apply_settings({"proportions": list(PROPORTIONS), "nanohead_dim": 3, "kv_group": 1, "arms": list(ARMS),
                               **PRESETS[args.preset]}, args.set)
    settings["proportions"] = [float(p) for p in settings["proportions"]]
    unknown = [arm for arm in settings["arms"] if arm not in ARMS]
    if unknown or not settings["arms"]:
        raise UsageError(f"arms: unknown {unknown}, choose from {', '.join(ARMS)}")
    if settings["seeds"] < 1 or settings["max_steps"] < 1:
        raise UsageError("seeds and max_steps must be at least 1")
    return settings


def _summarise(runs: list[dict[str, Any]], proportions: Sequence[float]) -> tuple[list[dict[str, Any]], str]:
    """Per-proportion rows (mean, std, standard error, min, max over seeds) and the verdict, for the runs of one
    arm."""
    summary = []
    for proportion in proportions:
        rows = [run for run in runs if run["proportion"] == proportion]
        bpbs = [run["val_bpb"] for run in rows]
        mean, se = mean_and_se(bpbs)
        summary.append({
            "arm": rows[0]["arm"],
            "proportion": proportion,
            "achieved_proportion": rows[0]["achieved_proportion"],
            "nanoheads": rows[0]["nanoheads"],
            "normal_head_dim": rows[0]["normal_head_dim"],
            "parameters": rows[0]["parameters"],
            "val_bpb_mean": mean,
            "val_bpb_std": se * math.sqrt(len(bpbs)),
            "val_bpb_se": se,
            "val_bpb_min": min(bpbs),
            "val_bpb_max": max(bpbs),
            "train_tokens_per_second": statistics.fmean(run["train_tokens_per_second"] for run in rows),
            "seeds": len(rows),
        })
    base = next((row for row in summary if row["proportion"] == 0.0), None)
    if base is None:
        return summary, "no proportion-0 baseline in this sweep: no verdict"
    noise = max(row["val_bpb_max"] - row["val_bpb_min"] for row in summary)
    lines = []
    for row in summary:
        if row is base:
            continue
        delta = row["val_bpb_mean"] - base["val_bpb_mean"]
        row["delta_vs_baseline"] = delta
        row["delta_se"] = math.hypot(row["val_bpb_se"], base["val_bpb_se"])
        word = "better" if delta < 0 else "worse"
        beyond = abs(delta) > noise if noise > 0 else None
        lines.append(f"p={row['proportion']}: {delta:+.4f} +- {row['delta_se']:.4f} (SE) bpb ({word}"
                     + ("" if beyond is None else ", beyond the seed spread" if beyond else ", within the seed spread")
                     + ")")
    better = [row for row in summary if row is not base and row["delta_vs_baseline"] < 0
              and (noise == 0 or -row["delta_vs_baseline"] > noise)]
    verdict = ("supported: " if better else "not supported: ") + (
        "some proportion beats the plain GPT by more than the seed spread" if better
        else "no proportion beats the plain GPT (proportion 0) by more than the seed-to-seed spread") + (
        f" ({noise:.4f} bpb); " + "; ".join(lines))
    return summary, verdict


def _arm_gap(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per proportion: `logit_scale` minus `faithful` mean bpb, its standard error and whether it exceeds 2 SE."""
    rows = {(row["arm"], row["proportion"]): row for row in summary}
    gaps = []
    for (arm, proportion), scaled in rows.items():
        faithful = rows.get(("faithful", proportion))
        if arm != "logit_scale" or faithful is None:
            continue
        delta = scaled["val_bpb_mean"] - faithful["val_bpb_mean"]
        se = math.hypot(scaled["val_bpb_se"], faithful["val_bpb_se"])
        gaps.append({"proportion": proportion, "delta_bpb": delta, "se": se,
                     "beyond_2se": bool(se > 0 and abs(delta) > 2 * se)})
    return gaps


CARD = Path(__file__).resolve().parents[1] / "model_cards" / "nanohead_gpt.md"


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The card's results section, generated from a sweep's JSON: per arm and proportion the mean ± SE over seeds and
    the difference from the arm's p = 0 with its SE and whether it exceeds 2 SE; then the gap between the arms."""
    env = report.get("environment", {})
    begin, end = card_markers(run_section("nanohead_sweep", json_path))
    lines = [begin.format(json=json_path), "",
             f"Preset `{report['preset']}`, {report['parameters']:,} parameters, {report['settings']['max_steps']} "
             f"steps of {report['settings']['batch_size']} × {report['settings']['block_size']} tokens; "
             f"{hardware(env)}; "
             f"{len(report['runs'])} runs, {sum(run['train_seconds'] for run in report['runs']) / 60:.0f} min of "
             "training in all.", "",
             "| arm | p | seeds | val bpb, mean ± SE | vs p = 0 (± SE) | beyond 2 SE |", "|---|---|---|---|---|---|"]
    bases = {row["arm"]: row for row in report["summary"] if row["proportion"] == 0.0}
    for row in report["summary"]:
        base = bases.get(row["arm"])
        if base is None or row is base or row["proportion"] == 0.0:
            versus, beyond = "—", "—"
        else:
            delta = row["val_bpb_mean"] - base["val_bpb_mean"]
            se = math.hypot(row["val_bpb_se"], base["val_bpb_se"])
            versus, beyond = f"{delta:+.4f} ± {se:.4f}", "yes" if se > 0 and abs(delta) > 2 * se else "no"
        lines.append(f"| {row['arm']} | {row['proportion']} | {row['seeds']} | {row['val_bpb_mean']:.4f} ± "
                     f"{row['val_bpb_se']:.4f} | {versus} | {beyond} |")
    if report.get("arm_gap"):
        lines += ["", "| p | logit_scale − faithful (bpb ± SE) | beyond 2 SE |", "|---|---|---|"]
        lines += [f"| {gap['proportion']} | {gap['delta_bpb']:+.4f} ± {gap['se']:.4f} | "
                  f"{'yes' if gap['beyond_2se'] else 'no'} |" for gap in report["arm_gap"]]
    lines += ["", f"Verdict (code): {report['verdict']}", "", end]
    return "\n".join(lines)


def update_card(json_path: str | Path, card: Path = CARD) -> str:
    """Replace the card's generated results section with the one rendered from `json_path`."""
    return update_card_from_json(json_path, run_section("nanohead_sweep", json_path), card_block, card=card)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    summary = report["summary"]
    fig, (ax, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in report["runs"]:
        ax.plot(run["proportion"], run["val_bpb"], "o", color="0.6", markersize=4)
    arms = list(dict.fromkeys(row["arm"] for row in summary))
    for index, arm in enumerate(arms):
        rows = [row for row in summary if row["arm"] == arm]
        ax.errorbar([row["proportion"] for row in rows], [row["val_bpb_mean"] for row in rows],
                    yerr=[row["val_bpb_se"] for row in rows], fmt="s-", color=f"C{index}", capsize=4,
                    label=f"{arm}: mean +- SE over seeds")
        for row in rows:
            ax.annotate(f"{row['val_bpb_mean']:.4f}", (row["proportion"], row["val_bpb_mean"]),
                        textcoords="offset points", xytext=(0, 10 if index == 0 else -16), ha="center", fontsize=7)
    settings = report["settings"]
    ax.set_xlabel("nanohead proportion (share of attention QKV parameters)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"{report['parameters']:,} parameters, {settings['max_steps']} steps, {settings['seeds']} seeds",
                 fontsize=9)
    ax.margins(y=0.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    for index, arm in enumerate(arms):
        rows = [row for row in summary if row["arm"] == arm]
        ax_speed.plot([row["proportion"] for row in rows], [row["train_tokens_per_second"] for row in rows], "o-",
                      color=f"C{index}", label=arm)
    outside_legend(ax_speed)
    ax_speed.set_xlabel("nanohead proportion")
    ax_speed.set_ylabel("training tokens / s")
    ax_speed.set_title("training speed", fontsize=9)
    ax_speed.grid(alpha=0.3)
    fig.suptitle(figure_title(f"Nanohead sweep, nanohead dim {settings['nanohead_dim']}", report["preset"],
                              settings["max_steps"], report["environment"]), fontsize=10)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["card"]:  # python -m benchmarks.nanohead_sweep card <sweep JSON>: regenerate the card's section
        if len(argv) != 2:
            raise UsageError("usage: python -m benchmarks.nanohead_sweep card <nanohead_sweep.json>")
        print(update_card(argv[1]))
        return json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    device = resolve_device(args.device)
    try:
        fields = estimate_config(settings["target_params"], vocab_size=settings["vocab_size"],
                                 aspect_ratio=settings["aspect_ratio"], head_dim=settings["head_dim"],
                                 kv_group=settings["kv_group"], nanohead_dim=settings["nanohead_dim"],
                                 proportions=settings["proportions"])
        configs = {(arm, p): NanoheadConfig(vocab_size=settings["vocab_size"], nanohead_proportion=p,
                                            nanohead_dim=settings["nanohead_dim"],
                                            max_position_embeddings=settings["block_size"],
                                            learnable_logit_scale=ARMS[arm], **fields)
                   for arm in settings["arms"] for p in settings["proportions"]}
    except ValueError as error:
        raise UsageError(str(error)) from None

    data = prepare_corpus(settings["train_file"], vocab_size=settings["vocab_size"],
                          block_size=settings["block_size"], max_train_documents=settings["max_train_documents"])
    documents, tokenizer, train, validation = data["documents"], data["tokenizer"], data["train"], data["validation"]
    token_bytes = token_byte_lengths(tokenizer)
    eval_blocks = validation.blocks.select(range(min(len(validation.blocks), settings["max_eval_blocks"])))
    for config in configs.values():  # the tokenizer's special ids
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    output_dir = output_folder(args.output_dir, "nanohead_sweep", args.preset)
    trainer_class = resolve_trainer(get_spec("nanohead_gpt"))
    runs = []
    jobs = [(arm, p, seed) for arm in settings["arms"] for p in settings["proportions"]
            for seed in range(settings["seeds"])]
    for arm, proportion, seed in tqdm(jobs, desc="nanohead sweep", unit="run"):
        config = configs[arm, proportion]
        set_seed(seed)
        model = NanoheadForCausalLM(config)
        training_args = training_arguments(
            output_dir / "checkpoints", device=device, seed=seed, max_steps=settings["max_steps"],
            per_device_train_batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
            lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
            logging_steps=max(1, settings["max_steps"] // 10),
            bf16=args.bf16, disable_tqdm=True,
        )
        trainer = trainer_class.from_cli(model=model, args=training_args, tokenizer=tokenizer,
                                         train_dataset=train.blocks, eval_dataset=eval_blocks, objective_args={},
                                         train_texts=documents["train"])
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            bpb = exact_bits_per_byte(trainer.model, eval_blocks, token_bytes=token_bytes, batch_size=settings["batch_size"])
        split = config.nanohead_split
        runs.append({
            "arm": arm, "proportion": proportion, "seed": seed, "achieved_proportion": split.proportion,
            "nanoheads": split.num_nanoheads, "normal_head_dim": split.head_dim,
            "parameters": sum(p.numel() for p in model.parameters()),
            "val_bpb": bpb, "final_train_loss": next(
                (entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None),
            "mean_train_loss": result.training_loss,
            "train_tokens_per_second":
                settings["max_steps"] * settings["batch_size"] * settings["block_size"] / seconds,
            "train_seconds": seconds,
        })
        tqdm.write(f"{arm} p={proportion} seed={seed}: val bpb {bpb:.4f}, {runs[-1]['train_tokens_per_second']:.0f} tok/s")

    summary, verdicts = [], {}
    for arm in settings["arms"]:
        rows, verdicts[arm] = _summarise([run for run in runs if run["arm"] == arm], settings["proportions"])
        summary += rows
    verdict = " | ".join(f"{arm}: {text}" for arm, text in verdicts.items())
    report = {
        "experiment": "nanohead_sweep", "preset": args.preset, "settings": {**settings, "train_file": data["train_file"]},
        "model": fields, "parameters": runs[0]["parameters"], "target_params": settings["target_params"],
        "budget": "equal parameter count (the proportion does not change it)",
        "data": {"train_tokens": train.num_tokens, "validation_tokens": validation.num_tokens,
                 "eval_blocks": len(eval_blocks), "tokens_per_byte": validation.tokens_per_byte,
                 "tokenizer": f"BPE {len(tokenizer)}", "tokens_per_run": settings["max_steps"] * settings["batch_size"]
                 * settings["block_size"]},
        "optimizer": "AdamW (Trainer), cosine schedule, 10% warm-up, no weight decay",
        "environment": environment(device, torch.bfloat16 if args.bf16 else torch.float32),
        "arms": {arm: {"learnable_logit_scale": ARMS[arm]} for arm in settings["arms"]},
        "measures": ("faithful: nanoheads under the QK-norm sharpness cap (no logit above sqrt(d)); logit_scale: "
                     "nanoheads with a learnable per-head logit scale; their gap: the effect of the cap"),
        "runs": runs, "summary": summary, "verdicts": verdicts, "verdict": verdict,
        "arm_gap": _arm_gap(summary),
    }
    write_json(output_dir / "nanohead_sweep.json", report)
    plot(report, output_dir / "nanohead_sweep.png")
    print(format_table(summary, [("arm", "arm"), ("proportion", "p"), ("achieved_proportion", "achieved"), ("nanoheads", "nano heads"),
                                 ("normal_head_dim", "head dim"), ("parameters", "params"),
                                 ("val_bpb_mean", "val bpb"), ("val_bpb_se", "SE"), ("val_bpb_min", "min"),
                                 ("val_bpb_max", "max"), ("train_tokens_per_second", "train tok/s")]))
    print(f"\nverdict: {verdict}\nwrote {output_dir}/nanohead_sweep.json and nanohead_sweep.png")
    return report


if __name__ == "__main__":
    run_cli(main)
