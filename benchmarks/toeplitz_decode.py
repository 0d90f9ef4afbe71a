"""Cached decoding speed of the Toeplitz mixer: the eager dynamic-shape step against the shape-static step compiled
by `torch.compile` (through `generate(compile_config=...)`), beside the same-size Llama measured in the same run.

    taskset -c 0 python -m benchmarks.toeplitz_decode --threads 1 --batch_sizes 1,4 --prompt_lengths 1,256,448

Subjects, each timed with greedy `generate` of exactly `--new_tokens` tokens (median of `--runs` after `--warmup`
untimed calls, which also absorb the compilation):
- `toeplitz eager` (`decode_step="auto"` in eager mode = the dynamic O(t) step, the default),
- `toeplitz compiled`: `generate(..., compile_config=CompileConfig(fullgraph=True, dynamic=False))`; the model
  then creates its cache before the prefill and `generate` runs every decode step through the compiled forward,
  which takes the shape-static step (one graph per batch size, no recompilation per token),
- `llama eager` (its default dynamic key/value cache) and, with `--compile_llama`, `llama compiled`
  (`cache_implementation="static"` with the same compile config, the library's own compiled path).
Writes `toeplitz_decode.json` and prints a table with each subject's ratio to `llama eager`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from transformers import CompileConfig, LlamaForCausalLM

import hf_models  # noqa: F401  (fills the registry)
from hf_models.registry import get_spec, parse_config_overrides
from training.common import UsageError, run_cli

from .harness import (
    DTYPES,
    MIN_RUNS,
    environment,
    format_table,
    positive_ints,
    random_prompts,
    resolve_device,
    time_generation,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_overrides", default=None,
                        help="Toeplitz config fields over the registry's default (E=256, L=4, H=4, F=256, S=512).")
    parser.add_argument("--batch_sizes", type=positive_ints, default=[1, 4])
    parser.add_argument("--prompt_lengths", type=positive_ints, default=[1, 256, 448])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled subjects.")
    parser.add_argument("--compile_llama", action="store_true",
                        help="Also time Llama compiled with its static cache (slow to compile).")
    parser.add_argument("--no_baseline", action="store_true", help="Skip the Llama baseline.")
    parser.add_argument("--parallel_heads", type=int, choices=(0, 1), default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="Default: results/toeplitz-decode-<timestamp>.")
    return parser


def compile_config(backend: str, device: torch.device) -> CompileConfig:
    """Full-graph, static-shape compilation; CUDA graphs (`reduce-overhead`) on CUDA. `generate` compiles only on
    accelerators unless `_compile_all_devices` is set, the library's switch for CPUs."""
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                           mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True
    return config


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    spec = get_spec("toeplitz_mixer")
    try:
        config = spec.make_config(parse_config_overrides(args.config_overrides))
    except ValueError as error:
        raise UsageError(" ".join(str(error).split())) from None
    too_long = [p for p in args.prompt_lengths if p + args.new_tokens > config.max_position_embeddings]
    if too_long:
        raise UsageError(f"prompt lengths {too_long} + --new_tokens {args.new_tokens} exceed the context "
                         f"{config.max_position_embeddings}")
    torch.manual_seed(args.seed)
    model = spec.model_class(config).to(device=device, dtype=dtype).eval()
    compiled = compile_config(args.backend, device)
    head_kwargs = {"parallel_heads": bool(args.parallel_heads)}
    subjects: list[tuple[str, Any, dict[str, Any]]] = [
        ("toeplitz eager", model, head_kwargs),
        ("toeplitz compiled", model, {**head_kwargs, "compile_config": compiled}),
    ]
    if not args.no_baseline:
        torch.manual_seed(args.seed)
        llama = LlamaForCausalLM(spec.baseline_config(config)).to(device=device, dtype=dtype).eval()
        subjects.append(("llama eager", llama, {}))
        if args.compile_llama:
            subjects.append(("llama compiled", llama, {"cache_implementation": "static", "compile_config": compiled}))

    rows = []
    for name, subject, kwargs in subjects:
        for batch in args.batch_sizes:
            for prompt in args.prompt_lengths:
                input_ids = random_prompts(subject.config.vocab_size, batch, prompt, device=device, seed=args.seed)
                result = time_generation(subject, input_ids, new_tokens=args.new_tokens, use_cache=True,
                                         mode_kwargs=kwargs, warmup=args.warmup, runs=args.runs)
                rows.append({"subject": name, "batch_size": batch, "prompt_length": prompt,
                             "new_tokens": args.new_tokens, "tokens_per_second": result["tokens_per_second"],
                             "ms_per_token": result["ms_per_token"], "timing": result})
                print(f"{name:18s} B={batch} prompt={prompt}: {result['tokens_per_second']:.1f} tok/s", flush=True)
    reference = {(r["batch_size"], r["prompt_length"]): r["tokens_per_second"] for r in rows
                 if r["subject"] == "llama eager"}
    for row in rows:
        if (row["batch_size"], row["prompt_length"]) in reference:
            row["vs_llama_eager"] = row["tokens_per_second"] / reference[(row["batch_size"], row["prompt_length"])]
    return {
        "config": config.to_diff_dict(),
        "settings": {"new_tokens": args.new_tokens, "warmup": args.warmup, "runs": args.runs, "greedy": True,
                     "backend": args.backend, "parallel_heads": bool(args.parallel_heads),
                     "compile_config": compiled.to_dict(), "prompts": f"random token ids, seed {args.seed}"},
        "environment": environment(device, dtype),
        "rows": rows,
    }


COLUMNS = [("subject", "subject"), ("batch_size", "B"), ("prompt_length", "prompt"), ("new_tokens", "new"),
           ("tokens_per_second", "tok/s"), ("ms_per_token", "ms/step"), ("vs_llama_eager", "÷ llama eager")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 1 or args.runs < MIN_RUNS or args.warmup < 1:
        raise UsageError(f"--new_tokens must be >= 1, --runs >= {MIN_RUNS} and --warmup >= 1 (the compilation)")
    report = run_benchmark(args)
    output_dir = Path(args.output_dir or f"results/toeplitz-decode-{datetime.now():%Y-%m-%d_%H-%M-%S}")
    write_json(output_dir / "toeplitz_decode.json", report)
    print(format_table(report["rows"], COLUMNS))
    env = report["environment"]
    print(f"\n{env['device_name']}, {env['dtype']}, torch {env['torch']}, {env['torch_threads']} threads; median of "
          f"{args.runs} runs after {args.warmup} warm-up; wrote {output_dir}/toeplitz_decode.json")
    return report


if __name__ == "__main__":
    run_cli(main)
