"""Training throughput (tokens/s of forward + backward + AdamW step) of a zoo model against the same-size
Hugging Face Llama, in the same run.

    python -m benchmarks.throughput --model_type nanohead_gpt --set nanohead_proportion=0.4

Writes `throughput.json` and prints a table with the ratio to the baseline.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM

from training.common import UsageError, run_cli

from .generation import BASELINE, add_subject_arguments, load_subject
from .harness import DTYPES, MIN_RUNS, environment, format_table, output_folder, resolve_device, time_training, \
    write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="Default: results/throughput-<timestamp>.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.runs < MIN_RUNS or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 2:
        raise UsageError(f"--runs must be >= {MIN_RUNS}, --warmup >= 0, --batch_size >= 1 and --seq_len >= 2")
    spec, model = load_subject(args)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.seq_len > context:
        raise UsageError(f"--seq_len {args.seq_len} exceeds the model's context {context}")
    subjects = [(spec.model_type, model)]
    if not args.no_baseline and spec.model_type != "llama":
        torch.manual_seed(args.seed)
        subjects.append((BASELINE, LlamaForCausalLM(spec.baseline_config(model.config))))
    rows = []
    for name, subject in tqdm(subjects, desc="throughput", unit="model"):
        subject.to(device)  # parameters stay fp32; a lower --dtype runs under autocast
        result = time_training(subject, batch_size=args.batch_size, seq_len=args.seq_len, device=device, dtype=dtype,
                               warmup=args.warmup, runs=args.runs, seed=args.seed)
        rows.append({"model": name, "parameters": sum(p.numel() for p in subject.parameters()), **result})
    for row in rows[1:]:
        rows[0]["vs_llama"] = rows[0]["tokens_per_second"] / row["tokens_per_second"]
    report = {
        "model_type": spec.model_type,
        "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup, "runs": args.runs},
        "environment": environment(device, dtype),
        "rows": rows,
    }
    output_dir = output_folder(args.output_dir, "throughput")
    write_json(output_dir / "throughput.json", report)
    print(format_table(rows, [("model", "model"), ("parameters", "params"), ("tokens_per_second", "train tok/s"),
                              ("median_s", "s/step (median)"), ("p10_s", "p10"), ("p90_s", "p90"),
                              ("spread_p90_p10", "p90/p10"), ("noisy", "noisy (> 1.5)"), ("vs_llama", "/ llama")]))
    print(f"\n{report['environment']['device_name']}, {args.dtype}, batch {args.batch_size} × {args.seq_len} tokens; "
          f"wrote {output_dir}/throughput.json")
    return report


if __name__ == "__main__":
    run_cli(main)
