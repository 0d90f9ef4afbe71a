"""Verdicts of a Toeplitz mixer experiment run (`benchmarks.toeplitz_variants`): the seed README's questions
answered with the run's numbers, and `comparison_plots.png`.

    python -m benchmarks.analyze_toeplitz results/2025-11-25_10-00-00
    python -m benchmarks.analyze_toeplitz            # the newest run under results/

Prints every variant's metrics, the best eval loss, the fastest cached / uncached generation, the Pareto set of
eval loss vs cached tokens/s, the effect of the mean normaliser and of the projections on eval loss (each holding
the other flags fixed), the projections' decode overhead, the parallel-heads speed-ups (mean ± std across
variants) and, for 8-variant runs, the effect of the training head schedule. Writes `verdicts.json` and
`comparison_plots.png` into the run folder; a run of several seeds gets those of its first seed, and
`seed_summary.json`: eval loss per variant as mean ± SE over seeds and each ablation's difference paired by seed
with its SE and 2-SE verdict (also the core of the seed report `toeplitz_variants.json` and of the card's section).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.common import UsageError, run_cli

from .harness import MODEL_CARDS, card_markers, figure_title, format_table, mean_and_se, pyplot, run_section, save_figure, \
    write_json
from .seed_stats import mean_se, paired_difference, plus_minus

MODES = ("cached_parallel", "cached_sequential", "uncached_parallel", "uncached_sequential")
CARD = MODEL_CARDS / "toeplitz_mixer.md"
EFFECTS = (("mean normaliser", "do_toep_mean"), ("projections", "do_toep_proj"),
           ("parallel training schedule", "parallel_mixer"))


def _key(result: dict[str, Any]) -> tuple[bool, bool, bool]:
    config = result["config"]
    return config["do_toep_mean"], config["do_toep_proj"], config.get("parallel_mixer", True)


def _loss(result: dict[str, Any]) -> float:
    value = result["training"]["eval_loss"]
    return value if value is not None and math.isfinite(value) else math.inf


def _cached(result: dict[str, Any]) -> float:
    return max(result["generation"][m]["tokens_per_second"] for m in ("cached_parallel", "cached_sequential"))


def _uncached(result: dict[str, Any]) -> float:
    return max(result["generation"][m]["tokens_per_second"] for m in ("uncached_parallel", "uncached_sequential"))


def _spread(values: list[float]) -> dict[str, float]:
    mean, se = mean_and_se(values)
    return {"mean": mean, "std": se * math.sqrt(len(values)), "n": len(values)}


def analyze(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdicts of a run (a list of per-variant metrics dicts)."""
    if not results:
        raise UsageError("the run holds no variant results")
    by_key = {_key(r): r for r in results}
    verdicts: dict[str, Any] = {
        "best_eval_loss": min(results, key=_loss)["model_name"],
        "fastest_cached": max(results, key=_cached)["model_name"],
        "fastest_uncached": max(results, key=_uncached)["model_name"],
    }
    verdicts["pareto_eval_loss_vs_cached_speed"] = [
        r["model_name"] for r in results
        if not any(_loss(o) <= _loss(r) and _cached(o) >= _cached(r) and (_loss(o) < _loss(r) or _cached(o) > _cached(r))
                   for o in results)
    ]

    def paired(index: int) -> list[dict[str, Any]]:
        """(flag on, flag off) pairs that agree on the other flags."""
        pairs = []
        for key, on in by_key.items():
            if key[index]:
                off_key = tuple(not v if i == index else v for i, v in enumerate(key))
                if off_key in by_key:
                    pairs.append({"with": on["model_name"], "without": by_key[off_key]["model_name"],
                                  "delta_eval_loss": _loss(on) - _loss(by_key[off_key]),
                                  "speed_ratio_cached": _cached(on) / _cached(by_key[off_key]),
                                  "speed_ratio_uncached": _uncached(on) / _uncached(by_key[off_key])})
        return pairs

    verdicts["effect_of_mean"] = paired(0)
    verdicts["effect_of_projections"] = paired(1)
    verdicts["projection_overhead_cached"] = [1 / p["speed_ratio_cached"] - 1 for p in verdicts["effect_of_projections"]]
    if any(not key[2] for key in by_key):
        verdicts["effect_of_parallel_training_schedule"] = [
            {**p, "delta_train_runtime": _train_runtime(results, p["with"]) - _train_runtime(results, p["without"])}
            for p in paired(2)
        ]
    verdicts["parallel_speedup_cached"] = _spread([r["speedups"]["parallel_speedup_cached"] for r in results])
    verdicts["parallel_speedup_uncached"] = _spread([r["speedups"]["parallel_speedup_uncached"] for r in results])
    verdicts["cache_speedup_parallel"] = _spread([r["speedups"]["cache_speedup_parallel"] for r in results])
    longest = [r["extra"]["generation_sweep"][-1] for r in results if r.get("extra", {}).get("generation_sweep")]
    if longest:
        verdicts["cache_speedup_at_longest_prompt"] = {
            "prompt_length": longest[0]["prompt_length"],
            **_spread([row["cache_speedup_parallel"] for row in longest]),
        }
    return verdicts


def _train_runtime(results: list[dict[str, Any]], name: str) -> float:
    return next(r["training"]["train_runtime"] for r in results if r["model_name"] == name)


def print_verdicts(verdicts: dict[str, Any]) -> None:
    print("\n" + "=" * 80 + "\nVERDICTS\n" + "=" * 80)
    print(f"best eval loss:              {verdicts['best_eval_loss']}")
    print(f"fastest cached generation:   {verdicts['fastest_cached']}")
    print(f"fastest uncached generation: {verdicts['fastest_uncached']}")
    print(f"best trade-off (Pareto set of eval loss vs cached tok/s): {', '.join(verdicts['pareto_eval_loss_vs_cached_speed'])}")
    for title, key in (("mean normaliser", "effect_of_mean"), ("projections", "effect_of_projections"),
                       ("parallel training schedule", "effect_of_parallel_training_schedule")):
        for pair in verdicts.get(key, []):
            print(f"effect of {title}: {pair['with']} vs {pair['without']}: Δ eval loss {pair['delta_eval_loss']:+.4f}, "
                  f"cached speed ×{pair['speed_ratio_cached']:.3f}, uncached ×{pair['speed_ratio_uncached']:.3f}")
    overhead = verdicts["projection_overhead_cached"]
    if overhead:
        print(f"projection overhead (cached tok/s noproj ÷ proj − 1): "
              f"{', '.join(f'{value:+.1%}' for value in overhead)}")
    for key in ("parallel_speedup_cached", "parallel_speedup_uncached", "cache_speedup_parallel"):
        spread = verdicts[key]
        print(f"{key}: {spread['mean']:.3f} ± {spread['std']:.3f} over {spread['n']} variants")
    if "cache_speedup_at_longest_prompt" in verdicts:
        spread = verdicts["cache_speedup_at_longest_prompt"]
        print(f"cache speed-up at prompt {spread['prompt_length']}: {spread['mean']:.2f} ± {spread['std']:.2f}")


def plot_comparison(results: list[dict[str, Any]], path: str | Path) -> Path:
    """The 2×3 comparison figure: eval loss, train loss, train samples/s, tok/s of the 4 modes, the 4 speed-ups,
    eval loss vs cached tok/s."""
    plt = pyplot()

    names = [r["model_name"] for r in results]
    x = range(len(names))
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    panels = (
        (axes[0, 0], [r["training"]["eval_loss"] for r in results], "eval loss (nats/token)"),
        (axes[0, 1], [r["training"]["train_loss"] for r in results], "train loss (run mean)"),
        (axes[0, 2], [r["training"]["train_samples_per_second"] for r in results], "train samples / s"),
    )
    for ax, values, title in panels:
        ax.bar(x, values, color="tab:blue")
        ax.set_title(title)
        ax.set_ylabel(title)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    width = 0.2
    for i, mode in enumerate(MODES):
        axes[1, 0].bar([j + (i - 1.5) * width for j in x], [r["generation"][mode]["tokens_per_second"] for r in results],
                       width, label=mode)
    axes[1, 0].set_title("generation tokens / s (seed setting)")
    axes[1, 0].set_yscale("log")
    axes[1, 0].set_ylabel("tokens / s (log scale)")
    speedups = ("cache_speedup_parallel", "cache_speedup_sequential", "parallel_speedup_cached",
                "parallel_speedup_uncached")
    for i, key in enumerate(speedups):
        axes[1, 1].bar([j + (i - 1.5) * width for j in x], [r["speedups"][key] for r in results], width, label=key)
    axes[1, 1].axhline(1.0, color="black", linewidth=0.8)
    axes[1, 1].set_title("speed-ups (×)")
    axes[1, 1].set_ylabel("speed-up (×)")
    for ax in (axes[1, 0], axes[1, 1]):
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 2]
    for r in results:
        ax.scatter(r["generation"]["cached_parallel"]["tokens_per_second"], r["training"]["eval_loss"])
        ax.annotate(r["model_name"], (r["generation"]["cached_parallel"]["tokens_per_second"], r["training"]["eval_loss"]),
                    fontsize=7)
    ax.set_xlabel("cached parallel tokens / s")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("quality vs speed")
    extra = results[0]["extra"]
    fig.suptitle(figure_title(f"Toeplitz mixer variants ({len(results)})", extra.get("preset"),
                              extra["optimizer_steps"], extra["environment"]))
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# The seed report: every variant trained once per seed, the ablations paired by seed


def compact_run(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures of one variant's `metrics.json` that the seed report keeps (no weights, no log history):
    its flags and seed, eval and train losses, the eval-loss curve, runtime, size and the decode sweep (median
    tokens/s of the parallel-heads modes per prompt length)."""
    extra = metrics["extra"]
    return {
        "variant": metrics["model_name"], "seed": metrics["seed"], **metrics["config"],
        "eval_loss": _loss(metrics),
        "train_loss_run_mean": metrics["training"]["train_loss"],
        "train_loss_last_logged": extra["train_loss_last_logged"],
        "train_runtime_s": metrics["training"]["train_runtime"],
        "optimizer_steps": extra["optimizer_steps"],
        "num_parameters": extra["num_parameters"],
        "eval_curve": [[entry["step"], entry["eval_loss"]] for entry in extra["log_history"] if "eval_loss" in entry],
        "decode": [{"prompt_length": row["prompt_length"],
                    "cached_tok_s": row["cached_parallel"]["tokens_per_second_median"],
                    "uncached_tok_s": row["uncached_parallel"]["tokens_per_second_median"],
                    "cache_speedup": row["cache_speedup_parallel"]} for row in extra["generation_sweep"]],
    }


def seed_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant (in run order): the seeds, eval loss and last-logged train loss as mean ± SE over seeds, and the
    decode figures (cached / uncached tokens/s and the cache speed-up per prompt length, mean ± SE); per flag
    (mean normaliser, projections, training schedule) and each setting of the other flags: the paired difference
    `eval loss with − without`, paired by seed, with its SE and whether it exceeds 2 SE."""
    variants: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        variants.setdefault(run["variant"], []).append(run)
    rows = []
    for name, chosen in variants.items():
        rows.append({
            "variant": name, "seeds": [run["seed"] for run in chosen],
            "eval_loss": mean_se([run["eval_loss"] for run in chosen]),
            "train_loss_last_logged": None if any(run["train_loss_last_logged"] is None for run in chosen)
            else mean_se([run["train_loss_last_logged"] for run in chosen]),  # None: a run logged no loss
            "decode": [{"prompt_length": point["prompt_length"],
                        **{key: mean_se([run["decode"][i][key] for run in chosen])
                           for key in ("cached_tok_s", "uncached_tok_s", "cache_speedup")}}
                       for i, point in enumerate(chosen[0]["decode"])],
        })
    flags = {name: (chosen[0]["do_toep_mean"], chosen[0]["do_toep_proj"], chosen[0]["parallel_mixer"])
             for name, chosen in variants.items()}
    by_flags = {key: name for name, key in flags.items()}
    effects = []
    for index, (effect, flag) in enumerate(EFFECTS):
        for name, key in flags.items():
            off = by_flags.get(tuple(not v if i == index else v for i, v in enumerate(key)))
            if key[index] and off is not None:
                losses = [{run["seed"]: run["eval_loss"] for run in variants[n]} for n in (name, off)]
                effects.append({"effect": effect, "flag": flag, "with": name, "without": off,
                                **paired_difference(*losses)})
    return {"variants": rows, "effects": effects}


def seed_report(settings: dict[str, Any], results: list[dict[str, Any]], env: dict[str, Any],
                wall_time_s: float) -> dict[str, Any]:
    """The small JSON behind the card's section: settings, environment (with the OMP threads and the CPUs the
    process may use), the whole command's wall time, every (variant, seed) run compacted and their `seed_summary`."""
    runs = [compact_run(metrics) for metrics in results]
    return {
        "experiment": "toeplitz_variants", "preset": settings["preset"],
        "settings": {**{key: settings[key] for key in ("overrides", "model", "training", "bench", "seeds", "variants",
                                                        "schedules")},
                     "data": {**settings["data"], **({"train_file": Path(settings["data"]["train_file"]).name}
                                                     if settings["data"].get("train_file") else {})}},
        "environment": {**env, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "cpus_allowed": len(os.sched_getaffinity(0))},
        "wall_time_s": wall_time_s,
        "runs": runs,
        "summary": seed_summary(runs),
    }


def _beyond(effect: dict[str, Any]) -> str:
    return "yes" if effect["beyond_2se"] else "no"


def seed_verdict(summary: dict[str, Any]) -> str:
    """One sentence per effect, every figure read from `summary`."""
    parts = []
    for effect in summary["effects"]:
        direction = "lower" if effect["mean"] < 0 else "higher"
        measured = "beyond 2 SE: a measured effect" if effect["beyond_2se"] else "within 2 SE: not a measured effect"
        parts.append(f"{effect['effect']}: eval loss {effect['with']} − {effect['without']} = "
                     f"{plus_minus(effect, 3, signed=True)} over {len(effect['seeds'])} paired seeds ({direction} with "
                     f"the flag; {measured})")
    return "; ".join(parts) + "."


def card_table(report: dict[str, Any]) -> str:
    """The section's text: the setting (from the report), the per-variant table, the paired-effects table and the
    verdict."""
    settings, env, summary = report["settings"], report["environment"], report["summary"]
    model, training, bench, data = settings["model"], settings["training"], settings["bench"], settings["data"]
    first, last = bench["prompt_lengths"][0], bench["prompt_lengths"][-1]
    sizes = [run["num_parameters"] for run in report["runs"]]
    parameters = f"{min(sizes):,}–{max(sizes):,}" if min(sizes) < max(sizes) else f"{min(sizes):,}"
    overrides = ", ".join(f"{key}={value}" for key, value in settings["overrides"].items())
    setting = (
        f"Preset `{report['preset']}`{f' with `--set {overrides}`' if overrides else ''}: E={model['hidden_size']}, "
        f"L={model['num_hidden_layers']}, "
        f"H={model['num_heads']}, F={model['intermediate_size']}, S={model['max_position_embeddings']}, "
        f"{model['kernel_param']} kernels, dropout {model['dropout']}, {parameters} parameters; "
        f"BPE of {data['vocab_size']} tokens trained on `{data.get('train_file')}`, blocks of "
        f"{data['block_size']}; {training['max_steps']} steps of batch {training['per_device_train_batch_size']}, "
        f"lr {training['learning_rate']} {training['lr_scheduler_type']}; seeds {settings['seeds']} (initial weights "
        f"and data order; one data split). Generation: B={bench['batch_size']}, {bench['new_tokens']} new greedy "
        f"tokens, median of {bench['runs']} runs after {bench['warmup']} warm-up, parallel heads. Measured on "
        f"{env['device_name']}, {env['cpus_allowed']} core(s) allowed, {env['torch_threads']} torch thread(s), "
        f"OMP_NUM_THREADS={env['omp_num_threads']}, fp32, torch {env['torch']}; "
        f"{report['wall_time_s'] / 60:.1f} min for the whole command ({len(report['runs'])} trainings).")
    rows = []
    for row in summary["variants"]:
        decode = {point["prompt_length"]: point for point in row["decode"]}
        rows.append(
            f"| {row['variant']} | {len(row['seeds'])} | {plus_minus(row['eval_loss'], 3)} | "
            f"{plus_minus(row['train_loss_last_logged'], 3) if row['train_loss_last_logged'] else '—'} | "
            f"{decode[first]['cached_tok_s']['mean']:.0f} → {decode[last]['cached_tok_s']['mean']:.0f} | "
            f"{decode[first]['uncached_tok_s']['mean']:.0f} → {decode[last]['uncached_tok_s']['mean']:.0f} | "
            f"{plus_minus(decode[last]['cache_speedup'], 1)} |")
    variants = "\n".join([
        f"| variant | seeds | eval loss, mean ± SE | train loss (last log), mean ± SE | cached tok/s, prompt "
        f"{first} → {last} (mean) | uncached tok/s, prompt {first} → {last} (mean) | cache × at prompt {last} |",
        "|---|---|---|---|---|---|---|", *rows])
    effects = "\n".join([
        "| effect | with − without | Δ eval loss, mean ± SE (paired by seed) | per seed | beyond 2 SE |",
        "|---|---|---|---|---|",
        *(f"| {e['effect']} | {e['with']} − {e['without']} | {plus_minus(e, 3, signed=True)} | "
          f"{', '.join(f'{d:+.3f}' for d in e['differences'])} | {_beyond(e)} |" for e in summary["effects"])])
    return "\n\n".join([setting, variants, effects, f"Verdict (code): {seed_verdict(summary)}"])


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The card's seed-experiment section, generated from a `toeplitz_variants.json` report (between
    `card_markers`)."""
    begin, end = card_markers(run_section("toeplitz_variants", json_path))
    return f"{begin.format(json=json_path)}\n\n{card_table(report)}\n\n{end}"


def plot_seeds(report: dict[str, Any], path: str | Path) -> Path:
    """Eval loss per variant (each seed, and mean ± SE) and the paired effects (mean ± SE, the 2-SE band)."""
    plt = pyplot()
    summary, env, settings = report["summary"], report["environment"], report["settings"]
    fig, (ax, ax_effect) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [row["variant"] for row in summary["variants"]]
    for x, row in enumerate(summary["variants"]):
        seeds = [run["eval_loss"] for run in report["runs"] if run["variant"] == row["variant"]]
        ax.plot([x] * len(seeds), seeds, "o", color="0.6", markersize=4, label="one seed" if x == 0 else None)
        ax.errorbar(x, row["eval_loss"]["mean"], yerr=row["eval_loss"]["se"], fmt="s", color="C0", capsize=5,
                    label="mean ± SE" if x == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_xlabel("variant")
    ax.set_ylabel("held-out eval loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    labels = [f"{e['effect']}\n{e['with']} − {e['without']}" for e in summary["effects"]]
    for y, effect in enumerate(summary["effects"]):
        ax_effect.errorbar(effect["mean"], y, xerr=2 * effect["se"], fmt="none", color="C1", alpha=0.4,
                           linewidth=6, label="± 2 SE" if y == 0 else None)
        ax_effect.errorbar(effect["mean"], y, xerr=effect["se"], fmt="o", color="C1", capsize=5,
                           label="mean ± SE" if y == 0 else None)
    ax_effect.axvline(0, color="black", linewidth=0.8)
    ax_effect.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_effect.set_xlabel("Δ eval loss, with − without, paired by seed (nats/token)")
    ax_effect.legend(fontsize=8)
    ax_effect.grid(alpha=0.3, axis="x")
    fig.suptitle(f"toeplitz_variants, preset {report['preset']}: {settings['training']['max_steps']} steps, "
                 f"{len(settings['seeds'])} seeds; {env['device_name']}, {env['torch_threads']} thread(s)",
                 fontsize=10)
    return save_figure(fig, path)


def _newest_run(root: Path) -> Path:
    runs = sorted(path.parent for path in root.glob("*/all_results.json"))
    if not runs:
        raise UsageError(f"no run with all_results.json under {root}; pass the run folder")
    return runs[-1]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=None, help="A run folder (default: the newest under results/).")
    args = parser.parse_args(argv)
    run_dir = Path(args.run) if args.run else _newest_run(Path("results"))
    path = run_dir / "all_results.json"
    if not path.is_file():
        raise UsageError(f"{path} not found: pass a folder written by benchmarks.toeplitz_variants")
    results = json.loads(path.read_text(encoding="utf-8"))
    seeds = list(dict.fromkeys(r.get("seed") for r in results))
    if len(seeds) > 1:  # the verdicts below compare variants within one seed: the first; the seed summary spans all
        summary = seed_summary([compact_run(r) for r in results])
        print(seed_verdict(summary))
        write_json(run_dir / "seed_summary.json", summary)
        results = [r for r in results if r.get("seed") == seeds[0]]
        print(f"(the per-variant verdicts below are of seed {seeds[0]})")
    for r in results:
        print(f"\n--- {r['model_name']} --- config {r['config']}")
        print(format_table([{"key": k, "value": v} for k, v in r["training"].items()], [("key", "training"), ("value", "")]))
        print(format_table([{"mode": m, **{k: r["generation"][m][k] for k in ("tokens_per_second", "avg_time_seconds")}}
                            for m in MODES], [("mode", "mode"), ("tokens_per_second", "tok/s (mean time)"),
                                              ("avg_time_seconds", "avg s")]))
        print("speed-ups: " + ", ".join(f"{k} {v:.3f}" for k, v in r["speedups"].items()))
    verdicts = analyze(results)
    print_verdicts(verdicts)
    write_json(run_dir / "verdicts.json", verdicts)
    plot_comparison(results, run_dir / "comparison_plots.png")
    print(f"\nwrote {run_dir}/verdicts.json and comparison_plots.png")
    return verdicts


if __name__ == "__main__":
    run_cli(main)
