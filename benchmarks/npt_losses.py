"""The NPT loss ablation: which distillation losses let an NPT layer replace its base Llama layer?

    python -m benchmarks.npt_losses --preset smoke        # minutes on a 2-core CPU
    python -m benchmarks.npt_losses --preset full         # bigger teacher, longer runs, three layer positions
    python -m benchmarks.npt_losses --preset smoke --configs base,mg_exact,mg_seed --set steps=50

1. The teacher: a small Llama trained on `tinystories_valid_sample.txt` through the training CLI
   (`python -m training.train --model_type llama ...`), or reused from `<output_dir>/teacher` when it exists.
2. For every configuration: `NPTForCausalLM.from_llama(teacher, npt_layers=..., ...)` and `NPTTrainer` with the
   configuration's losses (one change at a time from `direct + fidelity + regularization`): each of the original's
   proposals in its sound version and as the seed wrote it, the repository's losses and stage schedule, the
   adaptive weightings, and a few architecture switches (affine generator, keep mode, gate_up, several layers).
3. Held-out metrics per configuration (`training.npt.evaluate_npt`): KL(teacher ‖ NPT) and top-1 agreement,
   PPL_base / PPL_npt / PPL_drop (modulation off: the attention is deleted in replace mode) and the recovery
   R = (PPL_drop − PPL_npt)/(PPL_drop − PPL_base), direct-loss NMSE, Var(s) — at step 0 and at the end, plus the
   KL every `eval_every` steps.

Writes `<output_dir>/<preset>/results.json`, `ablation.png` (bars of R and KL per configuration) and `curves.png`
(direct NMSE and KL against the step). A configuration whose loss fails (the original's orthogonality loss raises a
shape error) is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

import hf_models  # noqa: F401  (fills the registry)
from hf_models.npt import NPTForCausalLM
from training.common import UsageError, run_cli
from training.data import DataArguments, default_data_dir, load_documents, tokenize_and_pack
from training.npt import NPTLossModule, NPTLossOptions, NPTTrainer, evaluate_npt
from training.tokenization import load_tokenizer

from .harness import add_deprecated_settings, add_preset_argument, add_set_argument, apply_settings, card_markers, \
    environment, figure_title, format_table, hardware, mean_and_se, outside_legend, pyplot, run_section, save_figure, \
    torch_threads, training_arguments, update_card_from_json, write_json

CARD = Path(__file__).resolve().parents[1] / "model_cards" / "npt_llama.md"

BASE_LOSSES = "direct+fidelity+regularization"
# name → (NPT config fields, loss options); one change at a time from "base".
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "base": ({}, {}),
    "repo_losses": ({}, {"losses": "direct+attention+fidelity+regularization", "direct_impl": "repo",
                         "fidelity_impl": "mse", "schedule": "repo"}),
    "repo_smooth_schedule": ({}, {"losses": "direct+attention+fidelity+regularization", "schedule": "smooth"}),
    "attention_enc": ({}, {"losses": BASE_LOSSES + "+attention"}),
    "mg_exact": ({}, {"losses": BASE_LOSSES + "+mg"}),
    "mg_seed": ({}, {"losses": BASE_LOSSES + "+mg", "mg_impl": "seed"}),
    "decomposed_delta": ({}, {"losses": BASE_LOSSES + "+decomposed"}),
    "decomposed_seed": ({}, {"losses": BASE_LOSSES + "+decomposed", "decomposed_impl": "seed"}),
    "ib_rate": ({}, {"losses": BASE_LOSSES + "+ib", "weight_ib": 0.01}),
    "ib_seed": ({}, {"losses": BASE_LOSSES + "+ib", "ib_impl": "seed"}),
    "projection_direction": ({}, {"losses": BASE_LOSSES + "+projection"}),
    "projection_seed": ({}, {"losses": BASE_LOSSES + "+projection", "projection_impl": "seed"}),
    "orthogonality_pca": ({}, {"losses": BASE_LOSSES + "+orthogonality"}),
    "orthogonality_seed": ({}, {"losses": BASE_LOSSES + "+orthogonality", "orth_impl": "seed"}),
    "curriculum_valid": ({}, {"curriculum": "valid"}),
    "adaptive_invgrad": ({}, {"adaptive": "invgrad"}),
    "adaptive_gradnorm": ({}, {"adaptive": "gradnorm"}),
    "adaptive_uncertainty": ({}, {"adaptive": "uncertainty"}),
    "adaptive_seed": ({}, {"adaptive": "seed"}),
    # the control of adaptive_invgrad: static weights at the values that run (same seed) converged to
    "fixed_invgrad": ({}, {}),
    "generator_affine": ({"np_generator": "affine"}, {}),
    "residual_keep": ({"np_residual_mode": "keep"}, {}),
    "modulation_gate_up": ({"np_modulation": "gate_up"}, {}),
    "keep_affine_gate_up": ({"np_residual_mode": "keep", "np_generator": "affine", "np_modulation": "gate_up"}, {}),
    "keep_affine_gate_up_mg": ({"np_residual_mode": "keep", "np_generator": "affine", "np_modulation": "gate_up"},
                               {"losses": BASE_LOSSES + "+mg"}),
}
# a fixed-weights control → the adaptive configuration whose converged weights (same seed) it trains with
FIXED_CONTROLS = {"fixed_invgrad": "adaptive_invgrad"}
CONVERGED_LAST = 5  # the converged weights: mean of the last this-many logged steps' applied weights
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(teacher_overrides="hidden_size=64,intermediate_size=176,num_hidden_layers=4,num_attention_heads=4,"
                                    "num_key_value_heads=2,max_position_embeddings=128",
                  teacher_steps=300, teacher_lr=3e-3, vocab_size=512, block_size=64, max_documents=3000,
                  layers=[[2]], steps=400, lr=3e-3, batch_size=8, eval_batches=8, eval_every=100, np_rank=32,
                  multi_layer=[1, 2, 3]),
    "full": dict(teacher_overrides="hidden_size=256,intermediate_size=688,num_hidden_layers=8,num_attention_heads=8,"
                                   "num_key_value_heads=4,max_position_embeddings=256",
                 teacher_steps=3000, teacher_lr=1e-3, vocab_size=2048, block_size=128, max_documents=None,
                 layers=[[2], [4], [7]], steps=2000, lr=1e-3, batch_size=16, eval_batches=20, eval_every=250,
                 np_rank=64, multi_layer=[2, 3, 4, 5, 6, 7]),
}
# A 6-layer teacher 1.5x as wide as smoke's, twice the vocabulary, 1.5x the steps, the NPT layer in the middle
# (layer 3): ~0.9M parameters; 16 minutes measured on one AMD EPYC core for the inverse-gradient configurations and
# their controls (`--configs base,residual_keep,adaptive_invgrad,fixed_invgrad`, 3 seeds; the card's medium section).
PRESETS["medium"] = dict(teacher_overrides="hidden_size=96,intermediate_size=256,num_hidden_layers=6,"
                                           "num_attention_heads=4,num_key_value_heads=2,max_position_embeddings=128",
                         teacher_steps=600, teacher_lr=3e-3, vocab_size=1024, block_size=64, max_documents=None,
                         layers=[[3]], steps=600, lr=3e-3, batch_size=8, eval_batches=8, eval_every=150, np_rank=32,
                         multi_layer=[2, 3, 4])
# One point at a ~20M-parameter teacher on an H200 in about a minute (benchmarks.gpu_campaign runs a few
# configurations with --configs; sized by estimate, not yet measured on a GPU).
PRESETS["gpu"] = dict(teacher_overrides="hidden_size=512,intermediate_size=1376,num_hidden_layers=8,"
                                        "num_attention_heads=8,num_key_value_heads=4,max_position_embeddings=256",
                      teacher_steps=400, teacher_lr=1e-3, vocab_size=4096, block_size=128, max_documents=None,
                      layers=[[4]], steps=250, lr=1e-3, batch_size=32, eval_batches=10, eval_every=100, np_rank=64,
                      multi_layer=[3, 4, 5])


def train_teacher(folder: Path, data_file: Path, preset: dict[str, Any]) -> Path:
    """Train the base Llama through the training CLI unless `folder` already holds one."""
    if (folder / "model.safetensors").exists():
        return folder
    from training.train import main as train_main

    argv = ["--model_type", "llama", "--config_overrides", preset["teacher_overrides"], "--train_file", str(data_file),
            "--vocab_size", str(preset["vocab_size"]), "--block_size", str(preset["block_size"]),
            "--max_steps", str(preset["teacher_steps"]), "--learning_rate", str(preset["teacher_lr"]),
            "--per_device_train_batch_size", "16", "--output_dir", str(folder), "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "50", "--seed", "0", "--sample_max_new_tokens", "32",
            "--disable_tqdm", "true", "--overwrite_output_dir"]  # an interrupted earlier teacher is retrained
    if preset["max_documents"]:
        argv += ["--max_train_documents", str(preset["max_documents"])]
    train_main(argv)
    return folder


class _EvalCurve(TrainerCallback):
    """Held-out KL / NMSE every `every` steps."""

    def __init__(self, model: NPTForCausalLM, blocks, every: int, batches: int, batch_size: int) -> None:
        self.model, self.blocks, self.every, self.batches, self.batch_size = model, blocks, every, batches, batch_size
        self.points: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            metrics = evaluate_npt(self.model, self.blocks, self.batch_size, self.batches)
            self.points.append({"step": state.global_step, **metrics})


def run_config(name: str, teacher: Path, layers: Sequence[int], fields: dict[str, Any], loss_args: dict[str, Any],
               blocks: dict[str, Any], preset: dict[str, Any], work_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Convert, distil and evaluate one configuration (NP initialisation and data order from `seed`)."""
    set_seed(seed)
    model = NPTForCausalLM.from_llama(str(teacher), npt_layers=list(layers), np_rank=preset["np_rank"], **fields)
    options = NPTLossOptions.from_args({"stage1_steps": max(1, preset["steps"] // 6), **loss_args})
    validation = blocks["validation"]
    before = evaluate_npt(model, validation, preset["batch_size"], preset["eval_batches"])
    curve = _EvalCurve(model, validation, preset["eval_every"], preset["eval_batches"], preset["batch_size"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = training_arguments(
        work_dir, device=device, seed=seed, max_steps=preset["steps"], per_device_train_batch_size=preset["batch_size"],
        learning_rate=preset["lr"], lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
        logging_steps=10, disable_tqdm=True,
    )
    trainer = NPTTrainer(model=model, args=args, train_dataset=blocks["train"],
                         loss_module=NPTLossModule(options), callbacks=[curve])
    started = time.perf_counter()
    result: dict[str, Any] = {"name": name, "seed": seed, "layers": list(layers), "npt_fields": fields, "loss_options": loss_args,
                              "np_parameters": sum(p.numel() for _, p in model.np_parameters()), "before": before}
    try:
        trainer.train()
    except (RuntimeError, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        return result
    result["train_seconds"] = time.perf_counter() - started
    result["after"] = evaluate_npt(model, validation, preset["batch_size"], preset["eval_batches"])
    result["curve"] = [{"step": 0, **before}] + curve.points
    if loss_args.get("adaptive", "none") != "none":
        # The log is kept only where a figure derives from it (the converged weights), in its loss columns only.
        result["log"] = [{key: value for key, value in entry.items() if key == "step" or key.startswith("loss")}
                         for entry in trainer.state.log_history if "loss" in entry]
        result["converged_weights"] = converged_weights(result["log"])
    return result


def converged_weights(log: Sequence[dict[str, Any]], last: int = CONVERGED_LAST) -> dict[str, float]:
    """The loss weights a run converged to: the mean over its last `last` logged steps of each applied weight, keyed
    by the `NPTLossOptions` field that sets it statically (`weight_<loss>`; the log names it `loss_weight_<loss>`)."""
    tail = list(log)[-last:]
    names = sorted({key for entry in tail for key in entry if key.startswith("loss_weight_")})
    return {name.removeprefix("loss_"): statistics.fmean(float(entry[name]) for entry in tail if name in entry)
            for name in names}


def residual_mode(result: dict[str, Any]) -> str:
    return result["npt_fields"].get("np_residual_mode", "replace")


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration and layer set: mean ± SE over seeds of KL, top-1, R and R's denominator PPL_drop − PPL_base;
    `kl_rank` / `top1_rank` rank every row across residual modes, `r_rank` only among rows of the same residual
    mode and layer set (R's denominator differs by an order of magnitude between modes and grows with the layers
    replaced, so R is not comparable across them)."""
    groups: dict[tuple[str, tuple[int, ...]], list[dict[str, Any]]] = {}
    for result in results:
        if "after" in result:
            groups.setdefault((result["name"], tuple(result["layers"])), []).append(result)
    rows = []
    for (name, layers), runs in groups.items():
        row: dict[str, Any] = {"config": name, "layers": ",".join(map(str, layers)), "mode": residual_mode(runs[0]),
                               "seeds": len(runs)}
        values = {"kl": [r["after"]["kl"] for r in runs], "top1": [r["after"]["top1"] for r in runs],
                  "R": [r["after"]["recovery"] for r in runs], "ppl_npt": [r["after"]["ppl_npt"] for r in runs],
                  "denominator": [r["after"]["ppl_drop"] - r["after"]["ppl_base"] for r in runs]}
        for key, series in values.items():
            row[f"{key}_mean"], row[f"{key}_se"] = mean_and_se(series)
        rows.append(row)
    for key, reverse in (("kl", False), ("top1", True)):
        for rank, row in enumerate(sorted(rows, key=lambda r: r[f"{key}_mean"], reverse=reverse), 1):
            row[f"{key}_rank"] = rank
    for group in {(row["mode"], row["layers"]) for row in rows}:
        within = sorted((r for r in rows if (r["mode"], r["layers"]) == group), key=lambda r: r["R_mean"], reverse=True)
        for rank, row in enumerate(within, 1):
            row["r_rank"] = rank
    return sorted(rows, key=lambda r: r["kl_rank"])


def control_verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fixed-weights control: KL(control) − KL(adaptive) with its SE (the two SEs in quadrature) and whether the
    difference exceeds 2 SE, i.e. whether the adaptivity matters beyond the values of the weights it converged to."""
    by_key = {(row["config"], row["layers"]): row for row in rows}
    verdicts = []
    for control, adaptive in FIXED_CONTROLS.items():
        for (name, layers), row in by_key.items():
            other = by_key.get((adaptive, layers))
            if name != control or other is None:
                continue
            delta = row["kl_mean"] - other["kl_mean"]
            se = math.hypot(row["kl_se"], other["kl_se"])
            verdicts.append({"control": control, "adaptive": adaptive, "layers": layers, "seeds": row["seeds"],
                             "delta_kl": delta, "se": se, "beyond_2se": bool(se > 0 and abs(delta) > 2 * se)})
    return verdicts


def plot(report: dict[str, Any], folder: Path) -> None:
    """`ablation.png` (R and KL after training per configuration, mean ± SE over seeds, R's denominator in the label)
    and `curves.png` (held-out KL and direct NMSE by step, mean ± SE over seeds per configuration), from a report."""
    plt = pyplot()
    results, settings, env = report["results"], report["settings"], report.get("environment", {})
    rows = summarize(results)
    labels = [f"{r['config']} L{r['layers']} [{r['mode']}, R denom {r['denominator_mean']:.3g}]" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.3 * len(rows) + 2)))
    axes[0].barh(labels, [r["R_mean"] for r in rows], xerr=[r["R_se"] for r in rows], color="tab:blue", capsize=2)
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set(xlabel="recovery R = (PPL_drop − PPL_npt) / (PPL_drop − PPL_base)\n"
                       "mean ± SE; compare within a mode and layer set", ylabel="configuration, layers [mode]")
    axes[1].barh(labels, [r["kl_mean"] for r in rows], xerr=[r["kl_se"] for r in rows], color="tab:orange",
                 capsize=2)
    axes[1].set(xlabel="KL(teacher ‖ NPT), nats/token\nmean ± SE (ranked across modes)", xscale="log",
                ylabel="(same rows)")
    axes[1].set_yticklabels([])
    fig.suptitle(figure_title(f"NPT loss ablation after training ({settings['seeds']} seeds)", report["preset"],
                              settings["steps"], env))
    save_figure(fig, folder / "ablation.png")
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in (r for r in results if "after" in r):
        groups.setdefault(f"{r['name']} L{','.join(map(str, r['layers']))}", []).append(r)
    for index, (label, runs) in enumerate(groups.items()):
        steps = [point["step"] for point in runs[0]["curve"]]
        for ax, key in zip(axes, ("kl", "direct_nmse")):
            stats = [mean_and_se([run["curve"][i][key] for run in runs if i < len(run["curve"])])
                     for i in range(len(steps))]
            mean, se = [m for m, _ in stats], [e for _, e in stats]
            # ten colours a style: 26 configurations stay distinguishable
            (line,) = ax.plot(steps, mean, label=label, lw=1, ls=("-", "--", ":")[index // 10 % 3])
            ax.fill_between(steps, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)],
                            color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="training step", ylabel="held-out KL(teacher ‖ NPT), nats/token", yscale="log")
    axes[1].set(xlabel="training step", ylabel="held-out direct NMSE", yscale="log")
    outside_legend(axes[1], ncol=1 + len(groups) // 20)
    fig.suptitle(figure_title("NPT distillation curves, mean ± SE over seeds (band)", report["preset"],
                              settings["steps"], env))
    save_figure(fig, folder / "curves.png")


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The card's results section, generated from the ablation's JSON: every configuration ranked by KL across
    residual modes (with top-1), R per mode with its denominator and its rank within the mode, mean ± SE over seeds;
    the converged weights of the adaptive runs and the fixed-weights controls' verdicts."""
    env, settings = report.get("environment", {}), report["settings"]
    begin, end = card_markers(run_section("npt_losses", json_path))
    lines = [begin.format(json=json_path), "",
             f"Preset `{report['preset']}` ({settings['steps']} steps of {settings['batch_size']} × "
             f"{settings['block_size']} tokens, teacher `{settings['teacher_overrides']}`), {settings['seeds']} seeds "
             f"(NP initialisation and data order; one teacher, seed 0); wall time {report['wall_seconds'] / 60:.1f} "
             f"min on {hardware(env)} (load at the end, {env.get('cpu_count', '?')} cores). Mean ± SE over seeds. "
             "Ranked by KL(teacher ‖ NPT) across residual modes; R is ranked only among rows of the same mode and "
             "layer set, since its denominator PPL_drop − PPL_base differs between them.", "",
             "| KL rank | config | layers | mode | seeds | KL | top-1 (rank) | PPL_npt | R denominator | R | "
             "R rank in mode and layers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        lines.append(f"| {row['kl_rank']} | {row['config']} | {row['layers']} | {row['mode']} | {row['seeds']} | "
                     f"{row['kl_mean']:.4g} ± {row['kl_se']:.2g} | {row['top1_mean']:.4f} ± {row['top1_se']:.4f} "
                     f"({row['top1_rank']}) | {row['ppl_npt_mean']:.3f} ± {row['ppl_npt_se']:.3f} | "
                     f"{row['denominator_mean']:.3f} ± {row['denominator_se']:.3f} | {row['R_mean']:.3f} ± "
                     f"{row['R_se']:.3f} | {row['r_rank']} |")
    converged = [r for r in report["results"] if "converged_weights" in r]
    if converged:
        lines += ["", f"Weights the adaptive runs converged to (mean of the last {CONVERGED_LAST} logged steps); "
                      "each fixed-weights control trains with those of the adaptive run of its own seed:", ""]
        lines += [f"- {r['name']} seed {r['seed']} L{','.join(map(str, r['layers']))}: " +
                  ", ".join(f"{k.removeprefix('weight_')} {v:.4g}" for k, v in r["converged_weights"].items())
                  for r in converged]
    if report["controls"]:
        lines += ["", "| control − adaptive | layers | seeds | ΔKL ± SE | beyond 2 SE | adaptivity matters |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['control']} − {c['adaptive']} | {c['layers']} | {c['seeds']} | {c['delta_kl']:+.3g} ± "
                  f"{c['se']:.2g} | {'yes' if c['beyond_2se'] else 'no'} | "
                  f"{'yes' if c['beyond_2se'] and c['delta_kl'] > 0 else 'not shown'} |" for c in report["controls"]]
    lines += ["", end]
    return "\n".join(lines)


def update_card(json_path: str | Path, card: Path = CARD) -> str:
    """Replace the card's generated results section with the one rendered from `json_path`; re-plot the PNGs
    beside it."""
    json_path = Path(json_path)
    plot(json.loads(json_path.read_text(encoding="utf-8")), json_path.parent)
    return update_card_from_json(json_path, run_section("npt_losses", json_path), card_block, card=card)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields, e.g. --set steps=50,teacher_steps=100")
    parser.add_argument("--output_dir", default="model_cards/results/npt_losses",
                        help="results.json and the PNGs go to <output_dir>/<preset>/ (small files, tracked)")
    parser.add_argument("--work_dir", default="results/npt_losses",
                        help="the teacher and the trainer's scratch go to <work_dir>/<preset>/ (untracked)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per configuration (the teacher: seed 0)")
    parser.add_argument("--data_file", default=None, help="default: $HF_ZOO_DATA/tinystories_valid_sample.txt")
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    add_deprecated_settings(parser, {"steps": int, "teacher_steps": int})
    parser.add_argument("--no_multi_layer", action="store_true", help="skip the several-layer runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for smoke and medium, whose small matrices only lose from more)")
    if argv[:1] == ["card"]:  # python -m benchmarks.npt_losses card <results.json>: regenerate the card's section
        if len(argv) != 2:
            raise UsageError("usage: python -m benchmarks.npt_losses card <results.json>")
        print(update_card(argv[1]))
        return []
    args = parser.parse_args(argv)
    preset = apply_settings(PRESETS[args.preset], args.set)
    with torch_threads(args.threads or (1 if args.preset in ("smoke", "medium") else None)):
        return run(args, preset)


def run(args: argparse.Namespace, preset: dict[str, Any]) -> list[dict[str, Any]]:
    """The ablation with parsed arguments and the preset's settings (see the module docstring)."""
    names = list(CONFIGS) if args.configs is None else [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise UsageError(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    for control, adaptive in FIXED_CONTROLS.items():
        if control in names and adaptive not in names:
            raise UsageError(f"{control} takes its weights from {adaptive}; add it to --configs")
    names.sort(key=lambda n: n in FIXED_CONTROLS)  # the adaptive runs first: the controls read their weights
    data_file = Path(args.data_file) if args.data_file else default_data_dir() / "tinystories_valid_sample.txt"
    if not data_file.exists():
        raise UsageError(f"no corpus at {data_file}")
    folder, work = Path(args.output_dir) / args.preset, Path(args.work_dir) / args.preset
    folder.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    teacher = train_teacher(work / "teacher", data_file, preset)
    tokenizer = load_tokenizer(str(teacher))
    documents = load_documents(DataArguments(train_file=str(data_file), max_train_documents=preset["max_documents"]))
    blocks = {split: tokenize_and_pack(documents[split], tokenizer, preset["block_size"], split_name=split).blocks
              for split in ("train", "validation")}

    runs = [(name, layers) for layers in preset["layers"] for name in names]
    if not args.no_multi_layer:
        runs += [(name, preset["multi_layer"]) for name in ("base", "mg_exact") if name in names]
    runs = [(seed, name, layers) for seed in range(args.seeds) for name, layers in runs]
    results: list[dict[str, Any]] = []
    for number, (seed, name, layers) in enumerate(runs, 1):
        fields, loss_args = CONFIGS[name]
        if name in FIXED_CONTROLS:
            source = next((r for r in results if r["name"] == FIXED_CONTROLS[name] and r["seed"] == seed
                           and r["layers"] == list(layers) and "converged_weights" in r), None)
            if source is None:
                print(f"[{number}/{len(runs)}] {name} seed {seed}: skipped, {FIXED_CONTROLS[name]} failed", flush=True)
                continue
            loss_args = {**loss_args, **source["converged_weights"]}
        print(f"[{number}/{len(runs)}] {name} seed {seed} on layers {layers} ...", flush=True)
        result = run_config(name, teacher, layers, fields, loss_args, blocks, preset, work / "work", seed)
        results.append(result)
        after = result.get("after")
        print(f"    {'error: ' + result['error'] if after is None else ', '.join(f'{k}={after[k]:.4g}' for k in ('kl', 'top1', 'recovery', 'direct_nmse'))}",
              flush=True)

    summary = summarize(results)
    payload = {"preset": args.preset, "settings": {**preset, "seeds": args.seeds}, "model_type": "npt_llama",
               "environment": environment(torch.device("cpu"), torch.float32),
               "wall_seconds": time.perf_counter() - started, "teacher": str(teacher), "results": results,
               "summary": summary, "controls": control_verdicts(summary)}
    write_json(folder / "results.json", payload)
    plot(payload, folder)
    rows = [{"config": r["name"], "seed": r["seed"], "layers": ",".join(map(str, r["layers"])),
             **({"kl0": r["before"]["kl"], "kl": r["after"]["kl"], "top1": r["after"]["top1"],
                 "ppl_base": r["after"]["ppl_base"], "ppl_npt": r["after"]["ppl_npt"],
                 "ppl_drop": r["after"]["ppl_drop"], "R": r["after"]["recovery"],
                 "nmse": r["after"]["direct_nmse"], "var_s": r["after"]["s_var"]} if "after" in r else
                {"kl0": r["before"]["kl"], "kl": r["error"]})} for r in results]
    columns = [("config", "config"), ("seed", "seed"), ("layers", "layers"), ("kl0", "KL@0"), ("kl", "KL"), ("top1", "top1"),
               ("ppl_base", "PPL base"), ("ppl_npt", "PPL npt"), ("ppl_drop", "PPL drop"), ("R", "R"),
               ("nmse", "NMSE"), ("var_s", "Var(s)")]
    print(format_table(rows, columns))
    print(f"wrote {folder / 'results.json'}, {folder / 'ablation.png'}, {folder / 'curves.png'}")
    return results


if __name__ == "__main__":
    run_cli(main)
