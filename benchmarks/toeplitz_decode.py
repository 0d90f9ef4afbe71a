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

Memory-bandwidth floor: a decode step must at least read the weights it uses (all parameters, except that only the
batch's rows of an untied input embedding are read) and the state it attends to (the Toeplitz history of mixer
inputs, L·B·E per position, over t positions for the dynamic step and all S for the static one; Llama's keys and
values, 2·L·B·kv_width per position), so `floor = bytes per step / bandwidth`. The decode step's own time is
`(T(new_tokens) − T(1)) / (new_tokens − 1)` from a second, prefill-only timing (`generate` of 1 token), and the table
reports `floor ÷ step` (1 = at the floor). The bandwidth is `--bandwidth_gbs` (e.g. the vendor's peak: H100 SXM
3,350, H200 4,800), else measured here by copying a 256 MB buffer (`harness.measure_memory_bandwidth`).
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
    measure_memory_bandwidth,
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
    parser.add_argument("--bandwidth_gbs", type=float, default=None,
                        help="Memory bandwidth of the floor, GB/s (default: measured with a buffer copy).")
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


def bytes_per_decode_step(model: Any, batch: int, position: float, *, static_history: bool) -> float:
    """The bytes a decode step of `model` must read at least at `position` (see the module docstring)."""
    parameters = {id(p): p for p in model.parameters()}
    weights = sum(p.numel() * p.element_size() for p in parameters.values())
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not output:  # untied: the step reads `batch` rows of the input table
        weights -= (embedding.shape[0] - batch) * embedding.shape[1] * embedding.element_size()
    config = model.config
    element = next(iter(parameters.values())).element_size()
    if getattr(config, "model_type", None) == "toeplitz_mixer":
        positions = config.max_position_embeddings if static_history else position
        state = config.num_hidden_layers * batch * config.hidden_size * positions * element
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        state = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * head_dim * position * element
    return weights + state


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

    bandwidth = args.bandwidth_gbs or measure_memory_bandwidth(device)
    rows = []
    for name, subject, kwargs in subjects:
        for batch in args.batch_sizes:
            for prompt in args.prompt_lengths:
                input_ids = random_prompts(subject.config.vocab_size, batch, prompt, device=device, seed=args.seed)
                result = time_generation(subject, input_ids, new_tokens=args.new_tokens, use_cache=True,
                                         mode_kwargs=kwargs, warmup=args.warmup, runs=args.runs)
                prefill = time_generation(subject, input_ids, new_tokens=1, use_cache=True, mode_kwargs=kwargs,
                                          warmup=args.warmup, runs=args.runs)
                step_seconds = (result["median_s"] - prefill["median_s"]) / (args.new_tokens - 1)
                floor_bytes = bytes_per_decode_step(subject, batch, prompt + args.new_tokens / 2,
                                                    static_history=name == "toeplitz compiled")
                floor_seconds = floor_bytes / (bandwidth * 1e9)
                rows.append({"subject": name, "batch_size": batch, "prompt_length": prompt,
                             "new_tokens": args.new_tokens, "tokens_per_second": result["tokens_per_second"],
                             "ms_per_token": result["ms_per_token"], "decode_step_ms": 1000 * step_seconds,
                             "floor_ms": 1000 * floor_seconds, "bytes_per_step": floor_bytes,
                             "fraction_of_floor": floor_seconds / step_seconds if step_seconds > 0 else None,
                             "timing": result, "prefill_timing": prefill})
                print(f"{name:18s} B={batch} prompt={prompt}: {result['tokens_per_second']:.1f} tok/s, decode step "
                      f"{1000 * step_seconds:.3f} ms (floor {1000 * floor_seconds:.4f} ms)", flush=True)
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
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": "--bandwidth_gbs" if args.bandwidth_gbs else "measured (256 MB buffer copy)",
        "rows": rows,
    }


COLUMNS = [("subject", "subject"), ("batch_size", "B"), ("prompt_length", "prompt"), ("new_tokens", "new"),
           ("tokens_per_second", "tok/s"), ("ms_per_token", "ms/token"), ("decode_step_ms", "decode ms"),
           ("floor_ms", "floor ms"), ("fraction_of_floor", "floor ÷ step"), ("vs_llama_eager", "÷ llama eager")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2 or args.runs < MIN_RUNS or args.warmup < 1:
        raise UsageError(f"--new_tokens must be >= 2 (the decode step is timed against a 1-token run), --runs >= "
                         f"{MIN_RUNS} and --warmup >= 1 (the compilation)")
    if args.bandwidth_gbs is not None and args.bandwidth_gbs <= 0:
        raise UsageError("--bandwidth_gbs must be > 0")
    report = run_benchmark(args)
    output_dir = Path(args.output_dir or f"results/toeplitz-decode-{datetime.now():%Y-%m-%d_%H-%M-%S}")
    write_json(output_dir / "toeplitz_decode.json", report)
    print(format_table(report["rows"], COLUMNS))
    env = report["environment"]
    print(f"\n{env['device_name']}, {env['dtype']}, torch {env['torch']}, {env['torch_threads']} threads; median of "
          f"{args.runs} runs after {args.warmup} warm-up; floor at {report['bandwidth_gbs']:.1f} GB/s "
          f"({report['bandwidth_source']}); wrote {output_dir}/toeplitz_decode.json")
    return report


if __name__ == "__main__":
    run_cli(main)
