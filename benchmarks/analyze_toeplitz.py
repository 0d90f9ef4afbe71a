"""Verdicts of a Toeplitz mixer experiment run (`benchmarks.toeplitz_variants`): the seed README's questions
answered with the run's numbers, and `comparison_plots.png`.

    python -m benchmarks.analyze_toeplitz results/2025-11-25_10-00-00
    python -m benchmarks.analyze_toeplitz            # the newest run under results/

Prints every variant's metrics, the best eval loss, the fastest cached / uncached generation, the Pareto set of
eval loss vs cached tokens/s, the effect of the mean normaliser and of the projections on eval loss (each holding
the other flags fixed), the projections' decode overhead, the parallel-heads speed-ups (mean ± std across
variants) and, for 8-variant runs, the effect of the training head schedule. Writes `verdicts.json` and
`comparison_plots.png` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.common import UsageError, run_cli

from .harness import figure_title, format_table, mean_and_se, pyplot, save_figure, write_json

MODES = ("cached_parallel", "cached_sequential", "uncached_parallel", "uncached_sequential")


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
