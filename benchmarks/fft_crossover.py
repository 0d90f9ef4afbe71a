"""Where does the Bicameral LM's FFT long convolution overtake attention? Forward time against sequence length.

    python -m benchmarks.fft_crossover --hidden_size 256 --kernel_len 128 --lengths 128,256,512,1024,2048,4096

Two comparisons, each timed with the harness (median of `--runs` after `--warmup`):

* mixers only, `(batch, seq, hidden)` in and out, no projections: the FFT causal convolution with a `kernel_len`-tap
  kernel (what a Bicameral block computes), the same with a kernel as long as the sequence (a Hyena-style global
  convolution, where FFTs are the only sub-quadratic option), the direct `kernel_len`-tap convolution (what cached
  decoding uses), and causal SDPA attention over `hidden / head_dim` heads;
* whole one-layer models: `BicameralModel` against the same-size `LlamaModel` (the zoo's baseline, SDPA);
* one cached decode step of those models after a prompt of `seq` bytes (the Bicameral state is constant-size, the
  Llama key/value cache grows with the position).

The crossover is the first length from which the FFT path is faster than attention at every longer length.
Writes `fft_crossover.json` and `fft_crossover.png`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaModel

import hf_models  # noqa: F401  (fills the registry)
from hf_models.bicameral import BicameralConfig, BicameralModel
from hf_models.bicameral.modeling_bicameral import direct_causal_conv, fft_causal_conv
from hf_models.registry import get_spec
from training.common import UsageError, run_cli

from .harness import DTYPES, MIN_RUNS, environment, figure_title, format_table, output_folder, outside_legend, \
    positive_ints, pyplot, resolve_device, save_figure, time_runs, worst_spread, write_json

SERIES = ("fft_conv_k", "fft_conv_global", "direct_conv_k", "sdpa_attention", "bicameral_layer", "llama_layer",
          "bicameral_decode_step", "llama_decode_step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--kernel_len", type=int, default=128)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--lengths", type=positive_ints, default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output_dir", default=None, help="Default: results/fft_crossover-<timestamp>.")
    return parser


def _decode_step(model: torch.nn.Module, prompt: torch.Tensor):
    """Prefill `prompt` with the cache on and return a call that runs one cached step (each call appends a byte)."""
    cache = model(prompt, use_cache=True).cache
    step = prompt[:, -1:]
    return lambda: model(step, cache=cache, use_cache=True)


def crossover(rows: list[dict[str, Any]], fast: str, slow: str) -> int | None:
    """The first length from which `fast` beats `slow` at every longer length (None: never)."""
    result = None
    for row in reversed(rows):
        if row[fast] < row[slow]:
            result = row["length"]
        else:
            break
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.hidden_size % args.head_dim or args.runs < MIN_RUNS or args.warmup < 0:
        raise UsageError(f"--hidden_size must be a multiple of --head_dim, --runs >= {MIN_RUNS}, --warmup >= 0")
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    heads = args.hidden_size // args.head_dim
    longest = max(args.lengths)
    torch.manual_seed(0)
    config = BicameralConfig(hidden_size=args.hidden_size, num_hidden_layers=1, kernel_len=args.kernel_len,
                             max_position_embeddings=max(longest, args.kernel_len), token_vocab_size=0, dropout=0.0)
    bicameral = BicameralModel(config).to(device=device, dtype=dtype).eval()
    llama = LlamaModel(get_spec("bicameral_lm").baseline_config(config)).to(device=device, dtype=dtype).eval()
    kernel = torch.randn(args.kernel_len, device=device, dtype=dtype)

    rows = []
    for length in tqdm(args.lengths, desc="lengths", unit="length"):
        x = torch.randn(args.batch_size, length, args.hidden_size, device=device, dtype=dtype)
        heads_x = x.view(args.batch_size, length, heads, args.head_dim).transpose(1, 2)
        global_kernel = torch.randn(length, device=device, dtype=dtype)
        ids = torch.randint(0, 256, (args.batch_size, length), device=device)
        candidates = {
            "fft_conv_k": lambda: fft_causal_conv(x, kernel),
            "fft_conv_global": lambda: fft_causal_conv(x, global_kernel),
            "direct_conv_k": lambda: direct_causal_conv(x, kernel),
            "sdpa_attention": lambda: F.scaled_dot_product_attention(heads_x, heads_x, heads_x, is_causal=True),
            "bicameral_layer": lambda: bicameral(ids, use_cache=False),
            "llama_layer": lambda: llama(ids, use_cache=False),
        }
        with torch.no_grad():
            for name, model in (("bicameral_decode_step", bicameral), ("llama_decode_step", llama)):
                candidates[name] = _decode_step(model, ids)
        with torch.no_grad():
            timings = {name: time_runs(candidates[name], device=device, warmup=args.warmup, runs=args.runs).summary()
                       for name in SERIES}
        rows.append({"length": length, **{name: timing["median_s"] for name, timing in timings.items()},
                     **{f"{name}_timing": timing for name, timing in timings.items()},
                     **worst_spread(list(timings.values()))})

    report = {
        "settings": {"hidden_size": args.hidden_size, "kernel_len": args.kernel_len, "heads": heads,
                     "head_dim": args.head_dim, "batch_size": args.batch_size, "warmup": args.warmup,
                     "runs": args.runs, "pass": "forward, no grad",
                     "decode_step": "one cached step after a prompt of `length` bytes"},
        "environment": environment(device, dtype),
        "rows": rows,
        "crossover": {
            "fft_conv_k_beats_sdpa_from": crossover(rows, "fft_conv_k", "sdpa_attention"),
            "fft_conv_global_beats_sdpa_from": crossover(rows, "fft_conv_global", "sdpa_attention"),
            "fft_conv_k_beats_direct_conv_k_from": crossover(rows, "fft_conv_k", "direct_conv_k"),
            "bicameral_layer_beats_llama_layer_from": crossover(rows, "bicameral_layer", "llama_layer"),
            "bicameral_decode_step_beats_llama_from": crossover(rows, "bicameral_decode_step", "llama_decode_step"),
        },
    }
    output_dir = output_folder(args.output_dir, "fft_crossover")
    write_json(output_dir / "fft_crossover.json", report)
    plot(report, output_dir / "fft_crossover.png")
    print(format_table([{**row, **{name: 1000 * row[name] for name in SERIES}} for row in rows],
                       [("length", "seq"), *((name, f"{name} ms") for name in SERIES),
                        ("spread_p90_p10", "max p90/p10"), ("noisy", "p90/p10 > 1.5")]))
    print(f"\ncrossovers (first length from which the first is faster at every longer length): {report['crossover']}")
    print(f"{report['environment']['device_name']}, {args.dtype}, {report['environment']['torch_threads']} threads, "
          f"batch {args.batch_size}, hidden {args.hidden_size}, K={args.kernel_len}; wrote {output_dir}")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lengths = [row["length"] for row in report["rows"]]
    for name in SERIES:
        style = "^:" if "decode" in name else "s--" if "layer" in name else "o-"
        medians = [1000 * row[name] for row in report["rows"]]
        spread = [[1000 * (row[name] - row[f"{name}_timing"]["p10_s"]) for row in report["rows"]],
                  [1000 * (row[f"{name}_timing"]["p90_s"] - row[name]) for row in report["rows"]]]
        ax.errorbar(lengths, medians, yerr=spread, fmt=style, capsize=2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (bytes)")
    ax.set_ylabel("time, ms (median; bars: p10–p90 of the runs)")
    settings = report["settings"]
    ax.set_title(figure_title(f"fft_crossover: hidden {settings['hidden_size']}, K={settings['kernel_len']}, batch "
                              f"{settings['batch_size']}", None, None, report["environment"]), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    outside_legend(ax)
    save_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
