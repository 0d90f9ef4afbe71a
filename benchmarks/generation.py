"""Generation speed of a zoo model against the same-size Hugging Face Llama, measured in the same run.

    python -m benchmarks.generation --model out/llama
    python -m benchmarks.generation --model_type toeplitz_mixer --set hidden_size=256

For every mode the architecture registers (e.g. parallel / sequential heads), batch size and prompt length it
times greedy decoding of exactly `--new_tokens` tokens with and without the cache, then prints a table with the
cache speed-up and the ratio to the Llama baseline, and writes `generation.json` and `generation.png`. With
`--model FOLDER` the figures are also written to `FOLDER/benchmark.json` and into the folder's model card.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, LlamaForCausalLM, PreTrainedModel

import hf_models  # noqa: F401  (fills the registry)
from hf_models.registry import ArchitectureSpec, get_spec
from model_cards import BENCHMARK_FILE, update_benchmark_section
from training.common import UsageError, run_cli

from .harness import (
    DTYPES,
    MIN_RUNS,
    add_deprecated_override,
    add_set_argument,
    environment,
    figure_title,
    format_table,
    output_folder,
    parse_set,
    positive_ints,
    pyplot,
    random_prompts,
    rate_errors,
    resolve_device,
    save_figure,
    time_generation,
    worst_spread,
    write_json,
)

BASELINE = "llama (baseline)"


def add_subject_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (a trained folder or Hub id) or `--model_type` (random init, its config changed by `--set`): the
    subject that `load_subject` builds."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="A trained folder (or Hub id) to benchmark.")
    source.add_argument("--model_type", help="Benchmark a randomly initialised model of this architecture.")
    add_set_argument(parser, "config fields of --model_type over the registry's default, e.g. --set hidden_size=256")
    add_deprecated_override(parser, "--config_overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser)
    parser.add_argument("--batch_sizes", type=positive_ints, default=[1, 4])
    parser.add_argument("--prompt_lengths", type=positive_ints, default=None,
                        help="Default: 1, a quarter and a half of the context (those where prompt + new tokens fit).")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--modes", default=None, help="Comma-separated subset of the architecture's modes.")
    parser.add_argument("--no_uncached", action="store_true", help="Skip uncached decoding (slow at long prompts).")
    parser.add_argument("--no_baseline", action="store_true", help="Skip the same-size Llama baseline.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="Default: results/generation-<timestamp>.")
    return parser


def load_subject(args: argparse.Namespace) -> tuple[ArchitectureSpec, PreTrainedModel]:
    """The architecture and model named by `--model` or `--model_type`."""
    try:
        if args.model:
            config = AutoConfig.from_pretrained(args.model)
            spec = get_spec(config.model_type)
            return spec, spec.load_pretrained(args.model)
        spec = get_spec(args.model_type or "llama")
        torch.manual_seed(args.seed)
        return spec, spec.model_class(spec.make_config(parse_set(args.set)))
    except (OSError, ValueError) as error:
        raise UsageError(" ".join(str(error).split())) from None


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    spec, model = load_subject(args)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or 4096
    prompt_lengths = args.prompt_lengths or sorted(
        {p for p in (1, context // 4, context // 2) if p >= 1 and p + args.new_tokens <= context}
    )
    if not prompt_lengths:
        raise UsageError(f"--new_tokens {args.new_tokens} leaves no room for a prompt in the context {context}")
    too_long = [p for p in prompt_lengths if p + args.new_tokens > context]
    if too_long:
        raise UsageError(f"prompt lengths {too_long} + --new_tokens {args.new_tokens} exceed the context {context}")
    modes = dict(spec.benchmark_modes)
    if args.modes:
        unknown = sorted(set(args.modes.split(",")) - set(modes))
        if unknown:
            raise UsageError(f"unknown modes {unknown} for {spec.model_type}; known: {sorted(modes)}")
        modes = {name: modes[name] for name in args.modes.split(",")}

    subjects: list[tuple[str, str, PreTrainedModel, str, dict]] = [
        (spec.model_type, mode, model, spec.generate_method, dict(kwargs)) for mode, kwargs in modes.items()
    ]
    if not args.no_baseline and spec.model_type != "llama":
        torch.manual_seed(args.seed)
        subjects.append((BASELINE, "default", LlamaForCausalLM(spec.baseline_config(config)), "generate", {}))
    cache_settings = [True] if args.no_uncached else [True, False]

    rows = []
    jobs = [(s, b, p) for s in subjects for b in args.batch_sizes for p in prompt_lengths]
    for (name, mode, subject, method, kwargs), batch, prompt in tqdm(jobs, desc="benchmark", unit="setting"):
        subject.to(device=device, dtype=dtype).eval()
        supports_cache = spec.supports_cache if subject is model else True
        input_ids = random_prompts(subject.config.vocab_size, batch, prompt, device=device, seed=args.seed)
        row: dict[str, Any] = {"model": name, "mode": mode, "batch_size": batch, "prompt_length": prompt,
                               "new_tokens": args.new_tokens}
        for use_cache in cache_settings if supports_cache else [None]:
            result = time_generation(subject, input_ids, new_tokens=args.new_tokens, use_cache=use_cache,
                                     method=method, mode_kwargs=kwargs, warmup=args.warmup, runs=args.runs)
            key = {True: "cached", False: "uncached", None: "generate"}[use_cache]
            row[f"{key}_tokens_per_second"] = result["tokens_per_second"]
            row[f"{key}_timing"] = result
        timings = [row[f"{key}_timing"] for key in ("cached", "uncached", "generate") if f"{key}_timing" in row]
        row.update(worst_spread(timings))
        if "uncached_tokens_per_second" in row and "cached_tokens_per_second" in row:
            row["cache_speedup"] = row["cached_tokens_per_second"] / row["uncached_tokens_per_second"]
        rows.append(row)

    baseline = {(r["batch_size"], r["prompt_length"]): r for r in rows if r["model"] == BASELINE}
    for row in rows:
        reference = baseline.get((row["batch_size"], row["prompt_length"]))
        if reference is not None and row["model"] != BASELINE:
            for key in ("cached", "uncached"):
                if f"{key}_tokens_per_second" in row and f"{key}_tokens_per_second" in reference:
                    row[f"{key}_vs_llama"] = row[f"{key}_tokens_per_second"] / reference[f"{key}_tokens_per_second"]
    return {
        "model_type": spec.model_type,
        "source": args.model or "random init ({})".format(
            ",".join(f"{key}={value}" for key, value in parse_set(args.set).items()) or "default config"),
        "config": config.to_diff_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "settings": {"new_tokens": args.new_tokens, "warmup": args.warmup, "runs": args.runs, "greedy": True,
                     "prompts": "random token ids, seed %d" % args.seed},
        "environment": environment(device, dtype),
        "rows": rows,
    }


COLUMNS = [
    ("model", "model"), ("mode", "mode"), ("batch_size", "B"), ("prompt_length", "prompt"), ("new_tokens", "new"),
    ("cached_tokens_per_second", "cached tok/s"), ("uncached_tokens_per_second", "uncached tok/s"),
    ("generate_tokens_per_second", "tok/s"), ("cache_speedup", "cache ×"), ("cached_vs_llama", "cached / llama"),
    ("uncached_vs_llama", "uncached / llama"), ("spread_p90_p10", "max p90/p10"), ("noisy", "p90/p10 > 1.5"),
]


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    batch_sizes = sorted({row["batch_size"] for row in report["rows"]})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4), squeeze=False)
    for ax, batch in zip(axes[0], batch_sizes):
        series: dict[str, list[tuple[int, float, dict[str, Any]]]] = {}
        for row in report["rows"]:
            if row["batch_size"] != batch:
                continue
            for key in ("cached", "uncached", "generate"):
                if f"{key}_tokens_per_second" in row:
                    label = f"{row['model']} / {row['mode']} / {key}"
                    series.setdefault(label, []).append((row["prompt_length"], row[f"{key}_tokens_per_second"],
                                                         row[f"{key}_timing"]))
        for label, points in series.items():
            lengths, rates, timings = zip(*sorted(points, key=lambda point: point[0]))
            ax.errorbar(lengths, rates, yerr=rate_errors(rates, timings), fmt="o-" if "llama" not in label else "s--",
                        capsize=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("tokens / s (median; bars: p10–p90 of the runs)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    env = report["environment"]
    fig.suptitle(figure_title(f"{report['model_type']}: greedy decoding of {report['settings']['new_tokens']} new "
                              f"tokens ({env['dtype']})", None, None, env), fontsize=10)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 1 or args.runs < MIN_RUNS or args.warmup < 0:
        raise UsageError(f"--new_tokens must be >= 1, --runs >= {MIN_RUNS} and --warmup >= 0")
    report = run_benchmark(args)
    output_dir = output_folder(args.output_dir, "generation")
    write_json(output_dir / "generation.json", report)
    plot(report, output_dir / "generation.png")
    print(format_table(report["rows"], [c for c in COLUMNS if any(c[0] in row for row in report["rows"])]))
    print(f"\n{report['environment']['device_name']}, {report['environment']['dtype']}, torch "
          f"{report['environment']['torch']}, {report['environment']['torch_threads']} threads; median of "
          f"{args.runs} runs after {args.warmup} warm-up; wrote {output_dir}/generation.json and generation.png")
    if args.model and Path(args.model).is_dir():
        write_json(Path(args.model) / BENCHMARK_FILE, report)
        update_benchmark_section(args.model)
    return report


if __name__ == "__main__":
    run_cli(main)
