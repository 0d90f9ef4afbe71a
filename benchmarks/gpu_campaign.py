"""The GPU campaign: one prepared command that measures every architecture on a lent H100/H200 within a time budget.

Parts, in order (each writes `campaign.json` into `--output_dir` as soon as it has figures, so a killed run still
returns what it measured; a part or row that no longer fits in `--budget_s` is skipped with a line saying so):
1. `decode`: bf16, batch 1 and 8, prompt 1 and 1024 (or the context less the new tokens), 128 new tokens, every
   causal architecture at the seed-size setting (`SEED_SIZES`: E=512, L=10, the seeds' vocabularies) beside the
   same-size Llama: eager, static cache, compiled with CUDA graphs (`mode="reduce-overhead"`, the zoo's shape-static
   steps); tokens/s, ms/step, fraction of the memory-bandwidth floor (`benchmarks.decode`, at the bandwidth a
   buffer copy measures on the device).
2. `training`: forward + backward + AdamW step under bf16 autocast, batch 16 × 512, every architecture and its
   same-size Llama (`harness.time_training`); tokens/s and MFU = tokens/s × (6·N + 12·L·E·T) / the bf16 matmul rate
   measured on the device (N: parameters without the input embedding; the PaLM estimate, which counts a token
   mixer as attention).
3. `experiments`: the experiments' `gpu` presets (`benchmarks.toeplitz_variants`, `dual_head`,
   `sampler_coherence`, `nanohead_sweep`, `npt_losses`), each in a subprocess with the time left as its timeout;
   their JSON reports are embedded in `campaign.json` (their checkpoints stay in a scratch folder).
4. `correctness`: cached ≡ uncached greedy tokens of every causal architecture in bf16, and the Toeplitz
   shape-static step captured in a CUDA graph (`generate` compiled with `mode="reduce-overhead"`) ≡ the eager step
   (fp32: tokens and logits).

With the default budget the experiments part runs those that fit, in order; a second run with
`--parts experiments --experiments <the rest>` takes the others. `--dry_run` runs every part at toy sizes on the CPU (under two minutes; the compiled paths with the `eager` backend,
no inductor); `tests/test_gpu_campaign.py` runs it with a small budget.

When a GPU is lent (device tool `run`; the corpora and the wheels travel as carried, git-ignored folders):

    # here, once: the wheels (transformers >= 5.24 and datasets, which the GPU image lacks) and the corpora
    bash benchmarks/gpu_wheels.sh && mkdir -p .gpu_data && cp /work/shared/data/*.txt .gpu_data/
    # run: command and carry
    command: PYTHONUNBUFFERED=1 bash benchmarks/gpu_campaign.sh --budget_s 420 2>&1 | tee $OUT/campaign.log
    carry:   [".whl", ".gpu_data"]
    timeout_s: 540

`benchmarks/gpu_campaign.sh` prints the versions it finds, installs the carried wheels whose package is missing
or older there (`pip install --no-index --no-deps --target`), sets `HF_ZOO_DATA=.gpu_data`, and runs this module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from transformers import CompileConfig, LlamaForCausalLM

import hf_models  # noqa: F401  (fills the registry)
from hf_models.registry import ArchitectureSpec, all_specs
from training.common import UsageError, run_cli

from .decode import measure_decode
from .harness import environment, measure_memory_bandwidth, random_prompts, time_training, write_json

PARTS = ("decode", "training", "experiments", "correctness")
# Fraction of the budget by the end of each part (time a part leaves unused goes to the next).
PART_ENDS = {"decode": 0.45, "training": 0.55, "experiments": 0.90, "correctness": 1.0}
SEED_SIZES: dict[str, dict[str, Any]] = {
    "toeplitz_mixer": dict(hidden_size=512, num_hidden_layers=10, num_heads=4, intermediate_size=512,
                           max_position_embeddings=512, vocab_size=4096),
    "bicameral_lm": dict(hidden_size=512, num_hidden_layers=10, max_position_embeddings=1024, kernel_len=128,
                         cutoff=128, token_vocab_size=50257),
    "nanohead_gpt": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=4,
                         nanohead_proportion=0.2, nanohead_dim=3, vocab_size=32768, max_position_embeddings=2048),
    "npt_llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=128256, max_position_embeddings=2048,
                      tie_word_embeddings=True, npt_layers=[2]),
    "masked_diffusion_lm": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, vocab_size=50257,
                                max_position_embeddings=1024),
}
FULL = dict(batch_sizes=[1, 8], prompt=1024, new_tokens=128, train_batch=16, train_seq=512, check_tokens=32,
            check_prompt=16, backend="inductor", min_part_s=20.0)
DRY = dict(batch_sizes=[1, 2], prompt=1024, new_tokens=8, train_batch=2, train_seq=16, check_tokens=6,
           check_prompt=4, backend="eager", min_part_s=2.0)
# The experiments' gpu presets, and the toy settings of the dry run (as in each experiment's own test).
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "toeplitz_variants": dict(
        gpu=["--preset", "gpu", "--train_file", "{data}/tinystories_valid_sample.txt", "--output_root", "{out}"],
        dry=["--preset", "smoke", "--train_file", "{data}/tinystories_valid_sample.txt", "--output_root", "{out}",
             "--set", "training.max_steps=2,training.eval_steps=2,data.max_train_documents=60,data.vocab_size=300,"
                      "data.block_size=32,model.hidden_size=16,model.num_hidden_layers=1,model.num_heads=2,"
                      "model.intermediate_size=16,model.max_position_embeddings=64,bench.new_tokens=4,bench.runs=5,"
                      "bench.prompt_lengths=[1]",
             "--variants", "mean_proj"],
        report="**/all_results.json"),
    "dual_head": dict(
        gpu=["--preset", "gpu", "--data_dir", "{data}", "--output_dir", "{out}"],
        dry=["--preset", "smoke", "--data_dir", "{data}", "--output_dir", "{out}", "--set",
             "max_steps=2,hidden_size=16,num_hidden_layers=1,block_size=32,max_position_embeddings=32,kernel_len=8,"
             "cutoff=4,cutoff_schedule=[8],transition_bins=2,token_vocab_size=300,max_train_documents=20,seeds=[0],"
             "corpora=[tinyshakespeare.txt],thresholds=[9.0]"],
        report="dual_head.json"),
    "sampler_coherence": dict(
        gpu=["--preset", "gpu", "--set", "train_file={data}/tinystories_valid_sample.txt", "--output_dir", "{out}"],
        dry=["--output_dir", "{out}", "--set", "train_file={data}/tinystories_valid_sample.txt",
             "--set", "max_train_documents=100,vocab_size=300,block_size=24,hidden_size=32,num_hidden_layers=1,"
                      "batch_size=4,max_steps=2,reference_max_steps=2,start_sampler_step=1,start_critic_step=1,"
                      "end_critic_step=2,max_eval_blocks=4,num_prompts=2,mask_warmup_steps=1,mask_warmup_block=12,"
                      "prompt_tokens=4,new_tokens=4,step_counts=[2],seeds=1"],
        report="sampler_coherence.json"),
    "nanohead_sweep": dict(
        gpu=["--preset", "gpu", "--bf16", "--set", "train_file={data}/tinystories_valid_sample.txt", "--output_dir",
             "{out}"],
        dry=["--preset", "smoke", "--set", "proportions=[0,0.4],seeds=1,max_steps=2,target_params=60000,"
                                           "block_size=32,batch_size=4,max_train_documents=60,vocab_size=300",
             "--set", "train_file={data}/tinystories_valid_sample.txt", "--output_dir", "{out}"],
        report="nanohead_sweep.json"),
    "npt_losses": dict(
        gpu=["--preset", "gpu", "--configs", "base,mg_exact,residual_keep,keep_affine_gate_up", "--no_multi_layer",
             "--data_file", "{data}/tinystories_valid_sample.txt", "--output_dir", "{out}"],
        dry=["--preset", "smoke", "--configs", "base", "--set", "steps=2,teacher_steps=2", "--no_multi_layer",
             "--threads", "1", "--data_file", "{data}/tinystories_valid_sample.txt", "--output_dir", "{out}"],
        report="*/results.json"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_s", type=float, default=420.0, help="Wall-clock budget of the whole campaign.")
    parser.add_argument("--output_dir", default=None, help="Default: $OUT when set, else results/gpu-campaign-<time>.")
    parser.add_argument("--dry_run", action="store_true", help="Toy sizes on the CPU (every part, under 2 minutes).")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated subset of {', '.join(PARTS)}.")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help="Comma-separated subset (and order) of the experiments part: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--device", default="auto")
    return parser


class Campaign:
    """The budget clock and the report, written to `output_dir/campaign.json` after every piece of work."""

    def __init__(self, args: argparse.Namespace, output_dir: Path, device: torch.device) -> None:
        self.start = time.monotonic()
        self.budget = args.budget_s
        self.dry = args.dry_run
        self.experiments = [name for name in args.experiments.split(",") if name]
        self.sizes = DRY if args.dry_run else FULL
        self.device = device
        self.path = output_dir / "campaign.json"
        self.report: dict[str, Any] = {
            "started": datetime.now().isoformat(timespec="seconds"), "budget_s": args.budget_s,
            "dry_run": args.dry_run, "environment": environment(device, torch.bfloat16),
            "wheels_installed": os.environ.get("ZOO_WHEELS_INSTALLED", "none"), "parts": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, part: str) -> float:
        """`time.monotonic()` by which `part` should end."""
        return self.start + PART_ENDS[part] * self.budget

    def save(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        write_json(self.path, self.report)


def log(line: str) -> None:
    print(line, flush=True)


def causal_specs() -> list[ArchitectureSpec]:
    return [spec for spec in all_specs() if spec.task == "causal-lm" and spec.model_type != "llama"]


def campaign_config(spec: ArchitectureSpec, dry: bool) -> Any:
    """The seed-size config of `spec` (its tiny test config in a dry run)."""
    return spec.make_config(tiny=True) if dry else spec.make_config(SEED_SIZES[spec.model_type])


def prompt_lengths(config: Any, sizes: dict[str, Any]) -> list[int]:
    return sorted({1, min(sizes["prompt"], config.max_position_embeddings - sizes["new_tokens"])})


def free_device_memory() -> None:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_decode(campaign: Campaign, record: dict[str, Any]) -> None:
    sizes, device = campaign.sizes, campaign.device
    record["bandwidth_gbs"] = measure_memory_bandwidth(device, megabytes=256 if campaign.dry else 2048)
    record["bandwidth_source"] = "measured: copy of a float32 buffer (bytes read + written), median of 5"
    record["settings"] = {"dtype": "bfloat16", "batch_sizes": sizes["batch_sizes"], "new_tokens": sizes["new_tokens"],
                          "backend": sizes["backend"], "paths": "eager, static (library static cache), compiled "
                          "(fullgraph, dynamic=False; reduce-overhead on CUDA)", "runs": 5, "warmup": 1}
    record["architectures"] = {}
    specs = causal_specs()
    for index, spec in enumerate(specs):
        now = time.monotonic()
        share = (campaign.deadline("decode") - now) / (len(specs) - index)
        if share < campaign.sizes["min_part_s"] / 2:
            record["architectures"][spec.model_type] = {"skipped": "the time budget ran out"}
            log(f"decode {spec.model_type}: skipped, the time budget ran out")
            continue
        config = campaign_config(spec, campaign.dry)
        log(f"decode {spec.model_type}: {share:.0f} s")
        try:
            rows = measure_decode(spec, config, batch_sizes=sizes["batch_sizes"],
                                  prompt_lengths=prompt_lengths(config, sizes), new_tokens=sizes["new_tokens"],
                                  device=device, dtype=torch.bfloat16, bandwidth_gbs=record["bandwidth_gbs"],
                                  backend=sizes["backend"], static=True, deadline=now + share, log=log)
            record["architectures"][spec.model_type] = {"config": config.to_diff_dict(), "rows": rows}
        except Exception as error:  # noqa: BLE001  (a failure on the device is a finding: record it, go on)
            record["architectures"][spec.model_type] = {"error": f"{type(error).__name__}: {error}"[:500]}
            log(f"decode {spec.model_type}: {type(error).__name__}: {error}")
        free_device_memory()
        campaign.save()


def matmul_tflops(device: torch.device, dry: bool) -> float:
    """The bf16 matrix-product rate of `device` (TFLOP/s): the median of five products of random matrices."""
    size = 512 if dry else 8192
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    from .harness import time_runs

    timing = time_runs(lambda: a @ b, device=device, warmup=3, runs=5)
    return 2 * size**3 / timing.median / 1e12


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6·N + 12·L·E·T (N without the input embedding's parameters; tied ones counted once)."""
    parameters = {id(p): p for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    n = sum(p.numel() for p in parameters.values())
    if embedding is not output:
        n -= embedding.numel()
    config = model.config
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def part_training(campaign: Campaign, record: dict[str, Any]) -> None:
    sizes, device = campaign.sizes, campaign.device
    record["peak_bf16_tflops"] = matmul_tflops(device, campaign.dry)
    record["settings"] = {"batch_size": sizes["train_batch"], "seq_len": sizes["train_seq"],
                          "autocast": "bfloat16", "parameters": "float32", "optimizer": "AdamW", "runs": 5,
                          "warmup": 2, "mfu": "tokens/s x (6N + 12 L E T) / peak_bf16_tflops"}
    record["rows"] = []
    for spec in [spec for spec in all_specs() if spec.model_type != "llama"]:
        if time.monotonic() > campaign.deadline("training"):
            record["rows"].append({"model_type": spec.model_type, "skipped": "the time budget ran out"})
            log(f"training {spec.model_type}: skipped, the time budget ran out")
            continue
        config = campaign_config(spec, campaign.dry)
        for name, build in ((spec.model_type, lambda: spec.model_class(config)),
                            ("llama", lambda: LlamaForCausalLM(spec.baseline_config(config)))):
            row: dict[str, Any] = {"model_type": spec.model_type, "model": name}
            try:
                torch.manual_seed(0)
                model = build().to(device)
                result = time_training(model, batch_size=sizes["train_batch"], seq_len=sizes["train_seq"],
                                       device=device, dtype=torch.bfloat16, warmup=2, runs=5)
                flops = training_flops_per_token(model, sizes["train_seq"])
                row.update({"parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                            "tokens_per_second": result["tokens_per_second"], "flops_per_token": flops,
                            "mfu": result["tokens_per_second"] * flops / (record["peak_bf16_tflops"] * 1e12),
                            "timing": result})
                log(f"training {name:20s} ({spec.model_type}): {result['tokens_per_second']:.0f} tok/s, "
                    f"MFU {row['mfu']:.3f}")
                del model
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {error}"[:500]
                log(f"training {name} ({spec.model_type}): {row['error']}")
            record["rows"].append(row)
            free_device_memory()
        pair = [r for r in record["rows"][-2:] if "tokens_per_second" in r]
        if len(pair) == 2:
            pair[0]["vs_llama"] = pair[0]["tokens_per_second"] / pair[1]["tokens_per_second"]
        campaign.save()


def part_experiments(campaign: Campaign, record: dict[str, Any]) -> None:
    from training.data import default_data_dir  # imports `datasets`: a missing package fails this part only

    data = str(default_data_dir())
    scratch = Path(tempfile.mkdtemp(prefix="zoo-campaign-"))
    record["scratch"] = str(scratch)
    record["runs"] = {}
    for name in campaign.experiments:
        left = campaign.deadline("experiments") - time.monotonic()
        timeout = min(left, 30.0 if campaign.dry else 90.0)
        if timeout < campaign.sizes["min_part_s"]:
            record["runs"][name] = {"skipped": "the time budget ran out"}
            log(f"experiment {name}: skipped, the time budget ran out")
            continue
        out = scratch / name
        argv = [arg.format(data=data, out=out) for arg in EXPERIMENTS[name]["dry" if campaign.dry else "gpu"]]
        command = [sys.executable, "-m", f"benchmarks.{name}", *argv]
        run: dict[str, Any] = {"command": " ".join(command[1:]), "timeout_s": timeout}
        log(f"experiment {name}: timeout {timeout:.0f} s")
        start = time.monotonic()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if campaign.dry else "8")}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=Path(__file__).resolve().parents[1])
            run["returncode"] = done.returncode
            run["output_tail"] = (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired as expired:
            run["timed_out"] = True
            output = (expired.stdout or b"") + (expired.stderr or b"")
            run["output_tail"] = (output.decode(errors="replace") if isinstance(output, bytes) else output)[-3000:]
        run["seconds"] = time.monotonic() - start
        reports = sorted(out.glob(EXPERIMENTS[name]["report"])) if out.exists() else []
        if reports:
            run["report"] = json.loads(reports[-1].read_text())
        status = "timed out" if run.get("timed_out") else f"exit {run['returncode']}"
        log(f"experiment {name}: {status} after {run['seconds']:.0f} s, report {'found' if reports else 'missing'}")
        record["runs"][name] = run
        campaign.save()


def greedy(model: Any, input_ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)


def part_correctness(campaign: Campaign, record: dict[str, Any]) -> None:
    sizes, device = campaign.sizes, campaign.device
    record["cached_vs_uncached"] = {}
    for spec in causal_specs():
        if time.monotonic() > campaign.deadline("correctness"):
            record["cached_vs_uncached"][spec.model_type] = {"skipped": "the time budget ran out"}
            continue
        try:
            torch.manual_seed(0)
            config = campaign_config(spec, campaign.dry)
            model = spec.model_class(config).to(device=device, dtype=torch.bfloat16).eval()
            prompt = random_prompts(config.vocab_size, 2, sizes["check_prompt"], device=device, low=3)
            cached = greedy(model, prompt, sizes["check_tokens"], use_cache=True)[:, prompt.shape[1]:]
            uncached = greedy(model, prompt, sizes["check_tokens"], use_cache=False)[:, prompt.shape[1]:]
            same = (cached == uncached).float()
            differing = (same < 1).any(0).nonzero()
            result = {"identical": bool(same.all()), "agreement": same.mean().item(),
                      "first_difference": int(differing[0]) if len(differing) else None,
                      "settings": f"bf16, batch 2, prompt {sizes['check_prompt']}, {sizes['check_tokens']} tokens, "
                                  "random init"}
            del model
        except Exception as error:  # noqa: BLE001
            result = {"error": f"{type(error).__name__}: {error}"[:500]}
        record["cached_vs_uncached"][spec.model_type] = result
        log(f"cached == uncached {spec.model_type}: {result}")
        free_device_memory()
        campaign.save()
    record["toeplitz_graph_step"] = toeplitz_graph_check(campaign)
    log(f"toeplitz CUDA-graph step == eager step: {record['toeplitz_graph_step']}")


def toeplitz_graph_check(campaign: Campaign) -> dict[str, Any]:
    """Greedy tokens and logits of the Toeplitz mixer, eager (dynamic step) against `generate` compiled with CUDA
    graphs (the shape-static step; the `eager` compile backend in a dry run), fp32."""
    from hf_models.registry import get_spec

    if time.monotonic() > campaign.deadline("correctness") + 30:
        return {"skipped": "the time budget ran out"}
    device, sizes = campaign.device, campaign.sizes
    spec = get_spec("toeplitz_mixer")
    try:
        torch.manual_seed(0)
        overrides = {} if campaign.dry else dict(hidden_size=256, num_hidden_layers=4, max_position_embeddings=256)
        config = spec.make_config(overrides, tiny=campaign.dry)
        model = spec.model_class(config).to(device).eval()
        prompt = random_prompts(config.vocab_size, 2, sizes["check_prompt"], device=device)
        compiled = CompileConfig(fullgraph=True, dynamic=False, backend=sizes["backend"],
                                 mode="reduce-overhead" if device.type == "cuda" else "default")
        if device.type != "cuda":
            compiled._compile_all_devices = True
        outputs = {}
        for name, kwargs in (("eager", {}), ("graph", {"compile_config": compiled})):
            for _ in range(2):  # the second call replays the captured graph
                outputs[name] = greedy(model, prompt, sizes["check_tokens"], return_dict_in_generate=True,
                                       output_logits=True, **kwargs)
        eager, graph = outputs["eager"], outputs["graph"]
        difference = max((a - b).abs().max().item() for a, b in zip(eager.logits, graph.logits))
        scale = max(a.abs().max().item() for a in eager.logits)
        return {"identical_tokens": bool(torch.equal(eager.sequences, graph.sequences)),
                "max_abs_logit_difference": difference, "max_abs_logit": scale,
                "compiled": hasattr(model, "_compiled_call"), "mode": compiled.mode, "backend": compiled.backend,
                "settings": f"fp32, {config.hidden_size} wide, {config.num_hidden_layers} layers, batch 2, "
                            f"prompt {sizes['check_prompt']}, {sizes['check_tokens']} tokens"}
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        free_device_memory()


RUNNERS: dict[str, Callable[[Campaign, dict[str, Any]], None]] = {
    "decode": part_decode, "training": part_training, "experiments": part_experiments,
    "correctness": part_correctness,
}


def summary(report: dict[str, Any]) -> list[str]:
    """A few lines per part for the end of the log."""
    lines = []
    decode = report["parts"].get("decode", {})
    for model_type, result in decode.get("architectures", {}).items():
        for row in result.get("rows", []):
            if "tokens_per_second" in row and row["model"] != "llama":
                lines.append(f"decode {row['subject']:24s} B={row['batch_size']} prompt={row['prompt_length']}: "
                             f"{row['tokens_per_second']:.0f} tok/s, floor ÷ step {row['fraction_of_floor'] or math.nan:.3g}, "
                             f"÷ llama best {row.get('vs_llama_best', math.nan):.2f}")
    for row in report["parts"].get("training", {}).get("rows", []):
        if "vs_llama" in row:
            lines.append(f"training {row['model_type']}: {row['tokens_per_second']:.0f} tok/s, MFU {row['mfu']:.3f}, "
                         f"÷ llama {row['vs_llama']:.2f}")
    for name, run in report["parts"].get("experiments", {}).get("runs", {}).items():
        lines.append(f"experiment {name}: " + ("report" if "report" in run else run.get("skipped", "no report")))
    for part, record in report["parts"].items():
        if "skipped" in record or "error" in record:
            lines.append(f"{part}: {record.get('skipped') or record.get('error')}")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise UsageError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    unknown = sorted(set(args.experiments.split(",")) - set(EXPERIMENTS) - {""})
    if unknown:
        raise UsageError(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    if args.budget_s <= 0:
        raise UsageError("--budget_s must be > 0")
    device = torch.device("cpu") if args.dry_run else torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(args.output_dir or os.environ.get("OUT") or
                      f"results/gpu-campaign-{datetime.now():%Y-%m-%d_%H-%M-%S}")
    campaign = Campaign(args, output_dir, device)
    env = campaign.report["environment"]
    log(f"gpu_campaign: {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, python "
        f"{env['python']}, CUDA {torch.version.cuda}, wheels installed: {campaign.report['wheels_installed']}; "
        f"budget {args.budget_s:.0f} s{' (dry run)' if args.dry_run else ''}")
    if device.type != "cuda" and not args.dry_run:
        log("warning: no CUDA device; the figures are CPU figures at full sizes")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    campaign.save()
    for part in PARTS:
        record: dict[str, Any] = {}
        campaign.report["parts"][part] = record
        if part not in parts:
            record["skipped"] = "not in --parts"
        elif campaign.deadline(part) - time.monotonic() < campaign.sizes["min_part_s"]:
            record["skipped"] = "the time budget ran out"
        else:
            start = time.monotonic()
            log(f"== part {part} (until {campaign.deadline(part) - campaign.start:.0f} s of {args.budget_s:.0f})")
            try:
                RUNNERS[part](campaign, record)
            except Exception as error:  # noqa: BLE001  (the next parts still run)
                record["error"] = f"{type(error).__name__}: {error}"[:500]
            record["seconds"] = time.monotonic() - start
        if "skipped" in record:
            log(f"== part {part}: skipped ({record['skipped']})")
        campaign.save()
    log("\n".join(["", "summary:", *summary(campaign.report)]))
    log(f"wrote {campaign.path} after {campaign.elapsed():.0f} s")
    return campaign.report


if __name__ == "__main__":
    run_cli(main)
