"""Training tokens/s of one process against two data-parallel ranks (DDP, and FSDP through `--fsdp "full_shard
auto_wrap"`) for one architecture and the same-size Llama, in the same run, through the training CLI under torchrun.

    python -m benchmarks.scaling --model_type toeplitz_mixer --train_file ../shared/data/tinystories_valid_sample.txt

Each configuration trains `--max_steps` steps of `--per_device_batch_size` × `--block_size` tokens per rank, from
the same seed; tokens/s is the Trainer's `train_samples_per_second` × `--block_size` (the whole job's rate, so a
perfect 2-rank job doubles it). On a GPU machine torchrun's ranks use the GPUs (NCCL); `--nproc 1` alone gives the
single-GPU figure (add `--bf16`). Writes `scaling.json` with the ratio of each 2-rank mode to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import hf_models  # noqa: F401  (fills the registry)
from hf_models.registry import get_spec
from training.common import UsageError, run_cli

from .harness import environment, format_table, output_folder, parse_set, resolve_device, write_json

ROOT = Path(__file__).resolve().parents[1]
MODES = {"single": (1, ()), "ddp": (2, ()), "fsdp": (2, ("--fsdp", "full_shard auto_wrap"))}
TORCHRUN = (shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run").split()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="toeplitz_mixer")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="Config fields of both models (e.g. hidden_size=128,num_hidden_layers=4).")
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--modes", default="single,ddp,fsdp", help=f"Comma-separated, from {', '.join(MODES)}.")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--per_device_batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--threads_per_rank", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 training (GPU).")
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--output_dir", default=None, help="Default: results/scaling-<model_type>-<timestamp>.")
    return parser


def _train(model_type: str, overrides: dict[str, Any], mode: str, args: argparse.Namespace, port: int,
           workdir: Path) -> dict[str, Any]:
    ranks, extra = MODES[mode]
    out = workdir / f"{model_type}-{mode}"
    launcher = [*TORCHRUN, "--nproc_per_node", str(ranks), "--master_port", str(port)] if ranks > 1 else \
        [sys.executable]
    command = [*launcher, "-m", "training.train", "--model_type", model_type, "--train_file", args.train_file,
               "--config_overrides", ",".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
               "--max_train_documents", "2000", "--vocab_size", "1024", "--block_size", str(args.block_size),
               "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.per_device_batch_size),
               "--warmup_steps", "0", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
               "--disable_tqdm", "true", "--sample_max_new_tokens", "1", "--seed", "0", "--output_dir", str(out),
               *(["--bf16"] if args.bf16 else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise UsageError(f"{model_type} {mode} failed: {result.stderr.strip().splitlines()[-1]}")
    metrics = json.loads((out / "all_results.json").read_text())
    return {"model_type": model_type, "mode": mode, "ranks": ranks,
            "tokens_per_second": metrics["train_samples_per_second"] * args.block_size,
            "train_runtime_s": metrics["train_runtime"], "steps": args.max_steps,
            "global_batch": ranks * args.per_device_batch_size}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or "single" not in modes:
        raise UsageError(f"--modes: {unknown or 'single is required'} (choose from {', '.join(MODES)}; the ratios "
                         "are against 'single')")
    try:
        spec = get_spec(args.model_type)
        overrides = parse_set(args.set)
        config = spec.make_config(overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None
    subjects = [(args.model_type, overrides)]
    if not args.no_baseline and args.model_type != "llama":
        llama = spec.baseline_config(config)
        subjects.append(("llama", {key: getattr(llama, key) for key in
                                   ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "max_position_embeddings")}))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, (model_type, fields) in enumerate(subjects):
            for offset, mode in enumerate(modes):
                row = _train(model_type, fields, mode, args, 29600 + 10 * index + offset, Path(workdir))
                rows.append(row)
                print(f"{model_type:16s} {mode:6s} {row['tokens_per_second']:9.0f} tok/s", flush=True)
    for row in rows:
        single = next(r for r in rows if r["model_type"] == row["model_type"] and r["mode"] == "single")
        row["vs_single"] = row["tokens_per_second"] / single["tokens_per_second"]
        baseline = next((r for r in rows if r["model_type"] == "llama" and r["mode"] == row["mode"]), None)
        row["vs_llama_same_mode"] = row["tokens_per_second"] / baseline["tokens_per_second"] if baseline else None
    device = resolve_device("auto")
    report = {"benchmark": "scaling", "model_type": args.model_type, "overrides": overrides, "rows": rows,
              "threads_per_rank": args.threads_per_rank, "block_size": args.block_size,
              "environment": environment(device, torch.bfloat16 if args.bf16 else torch.float32),
              "machine_cpus": os.cpu_count()}
    folder = output_folder(args.output_dir, "scaling", args.model_type)
    write_json(folder / "scaling.json", report)
    print(format_table(rows, [("model_type", "model"), ("mode", "mode"), ("ranks", "ranks"),
                              ("tokens_per_second", "tok/s"), ("vs_single", "÷ 1 process"),
                              ("vs_llama_same_mode", "÷ Llama")]))
    print(f"wrote {folder / 'scaling.json'}")
    return report


if __name__ == "__main__":
    run_cli(main)
