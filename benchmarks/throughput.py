"""Training throughput (tokens/s of forward + backward + AdamW step) of a zoo model against the same-size
Hugging Face Llama, in the same run.

    python -m benchmarks.throughput --model_type nanohead_gpt --set nanohead_proportion=0.4
    taskset -c 1 python -m benchmarks.throughput --model_type bicameral_lm --threads 1 --compile

With `--compile` each model is also timed as `torch.compile(model)` (inductor; the first warm-up call compiles, the
timed steps reuse the graphs). With `--llama_zoo_loss` the control `llama-zoo-loss` is timed too: the same Llama with
its loss computed as every zoo LM's is on a CPU (`zoo_causal_lm_loss`, the chunked cross-entropy), which separates
that generic gain from an architecture's own. Writes `throughput.json` and prints a table with each row's ratio to
the baseline's eager path and to its best path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM

from training.common import UsageError, run_cli

from hf_models.modeling_zoo_common import zoo_causal_lm_loss

from .generation import BASELINE, add_subject_arguments, load_subject
from .harness import DTYPES, MIN_RUNS, card_command, environment, environment_line, format_table, generated_section, \
    output_folder, parse_set, resolve_device, time_training, torch_threads, write_json


LLAMA_ZOO_LOSS = "llama-zoo-loss"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--llama_zoo_loss", action="store_true",
                        help=f"also time the control {LLAMA_ZOO_LOSS!r}: the same Llama with the zoo's chunked "
                             "cross-entropy as its loss")
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="Default: results/throughput-<timestamp>.")
    return parser


COLUMNS = [("model", "model"), ("path", "path"), ("parameters", "params"), ("tokens_per_second", "train tok/s"),
           ("median_s", "s/step (median)"), ("p10_s", "p10"), ("p90_s", "p90"), ("spread_p90_p10", "p90/p10"),
           ("noisy", "noisy (> 1.5)"), ("vs_llama", "/ llama eager"), ("vs_llama_best", "/ llama best")]


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The model card's training-throughput section of one run, generated from its `throughput.json` report."""
    settings = report["settings"]
    header = (f"{environment_line(report['environment'])}; forward + backward + AdamW step on random tokens, batch "
              f"{settings['batch_size']} × {settings['seq_len']}, median of {settings['runs']} steps after "
              f"{settings['warmup']} warm-up"
              + (f"; compiled rows: `torch.compile(model, backend={settings['backend']!r})`" if settings.get("compile")
                 else "") + f"; config fields set: `{json.dumps(report.get('config_overrides') or {})}`.")
    summary = summary_line(report)
    return generated_section("throughput", json_path, header, format_table(report["rows"], COLUMNS, markdown=True),
                             summary)


def summary_line(report: dict[str, Any]) -> str:
    """The architecture's best path against Llama's best path, and against the control's (`--llama_zoo_loss`)."""
    rows, model = report["rows"], report["model_type"]
    best = {name: max((row["tokens_per_second"] for row in rows if row["model"] == name), default=None)
            for name in (model, BASELINE, LLAMA_ZOO_LOSS)}
    if best[model] is None or best[BASELINE] is None:
        return "No baseline in this run."
    path = max((row for row in rows if row["model"] == model), key=lambda row: row["tokens_per_second"])["path"]
    line = f"Best path ({path}): {best[model] / best[BASELINE]:.2f}× Llama's best path"
    if best[LLAMA_ZOO_LOSS] is not None:
        line += f", {best[model] / best[LLAMA_ZOO_LOSS]:.2f}× `{LLAMA_ZOO_LOSS}`'s best path"
    return line + "."


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if card_command(argv, "throughput", card_block):  # python -m benchmarks.throughput card <throughput.json>
        return None
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
    if args.llama_zoo_loss and spec.model_type != "llama":
        torch.manual_seed(args.seed)
        control = LlamaForCausalLM(spec.baseline_config(model.config))
        control.loss_function = zoo_causal_lm_loss  # transformers' override: LlamaForCausalLM calls it
        subjects.append((LLAMA_ZOO_LOSS, control))
    paths = ("eager", "compiled") if args.compile else ("eager",)
    rows = []
    with torch_threads(args.threads):
        for (name, subject), path in tqdm([(s, p) for s in subjects for p in paths], desc="throughput", unit="row"):
            subject.to(device)  # parameters stay fp32; a lower --dtype runs under autocast
            timed = torch.compile(subject, backend=args.backend) if path == "compiled" else subject
            result = time_training(timed, batch_size=args.batch_size, seq_len=args.seq_len, device=device,
                                   dtype=dtype, warmup=max(args.warmup, 2 if path == "compiled" else 0),
                                   runs=args.runs, seed=args.seed)
            rows.append({"model": name, "path": path, "parameters": sum(p.numel() for p in subject.parameters()),
                         **result})
        environment_now = environment(device, dtype)
    baseline = {row["path"]: row["tokens_per_second"] for row in rows if row["model"] == BASELINE}
    if baseline:
        for row in rows:
            if row["model"] != BASELINE:
                row["vs_llama"] = row["tokens_per_second"] / baseline["eager"]
                row["vs_llama_best"] = row["tokens_per_second"] / max(baseline.values())
    report = {
        "model_type": spec.model_type,
        "config": model.config.to_diff_dict(),
        "config_overrides": parse_set(args.set) if getattr(args, "set", None) else {},
        "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup, "runs": args.runs,
                     "compile": args.compile, "backend": args.backend if args.compile else None,
                     "llama_zoo_loss": args.llama_zoo_loss},
        "environment": environment_now,
        "rows": rows,
    }
    output_dir = output_folder(args.output_dir, "throughput")
    write_json(output_dir / "throughput.json", report)
    print(format_table(rows, COLUMNS))
    print(f"\n{report['environment']['device_name']}, {args.dtype}, batch {args.batch_size} × {args.seq_len} tokens; "
          f"wrote {output_dir}/throughput.json")
    return report


if __name__ == "__main__":
    run_cli(main)
