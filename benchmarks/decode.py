"""Cached decoding speed of any causal zoo architecture against the memory-bandwidth floor, eager and compiled,
beside the same-size Llama eager and compiled with its static cache, measured in the same run.

    taskset -c 1 python -m benchmarks.decode --model_type toeplitz_mixer --threads 1 --batch_sizes 1,4
    python -m benchmarks.decode --model_type nanohead_gpt --dtype bfloat16 --static     # on a GPU

Subjects, each timed with greedy `generate` of exactly `--new_tokens` tokens (median of `--runs` after `--warmup`
untimed calls, which also absorb the compilation):
- `X eager`: the architecture's default cached decoding,
- `X static` (with `--static`): the library's static cache without compilation, for architectures that have one,
- `X compiled`: `generate(..., compile_config=CompileConfig(fullgraph=True, dynamic=False))` (on CUDA
  `mode="reduce-overhead"`, i.e. CUDA graphs), with `cache_implementation="static"` for architectures that decode
  with the library's key/value caches (`_can_compile_fullgraph`), else with the architecture's own compileable cache
  (the Toeplitz mixer creates it before the prefill and takes its shape-static step),
- `llama eager` and `llama compiled-static` (and `llama static` with `--static`): the same-size Llama
  (`spec.baseline_config`),
- with `--llama_few_rows_head`, `llama-few-rows-head eager` and `compiled`: that Llama with its LM head applied
  through `few_rows_linear`, as the zoo's causal LMs apply theirs (a control: how much of an architecture's lead is
  that product's, which any model could use, rather than the architecture's).
An architecture without a shape-static decode path (`generate` then decodes eagerly: its cache is not compileable)
or whose compilation fails gets a row saying so, with no figures, instead of a crash.

Memory-bandwidth floor: a decode step must at least read the weights it uses (every parameter except the untied
input embedding's unread rows (only the batch's rows are read) and the auxiliary heads decoding never calls, e.g.
Bicameral's token head) and the state the step reads: keys and values (`2·L·B·kv_width` per position) of the
attention models, the Toeplitz history of mixer inputs (`L·B·E` per position), Bicameral's constant-size state (per
layer the ring buffer of the last `R = max(kernel_len, time_kernel_size)` inputs, `B·R·E`, a row of R kernel taps
and the time path's `time_kernel_size·E` weights).
The positions read are the mean over the decode, `prompt + new_tokens / 2`, for dynamic caches, and the whole
buffer for static ones (`prompt + new_tokens` for the library's static cache, the context `S` for the Toeplitz
static step). `floor = bytes per step / bandwidth`. The decode step's own time is
`(T(new_tokens) − T(1)) / (new_tokens − 1)` from a second, prefill-only timing (`generate` of 1 token), and the
table reports `floor ÷ step` (1 = at the floor). The bandwidth is `--bandwidth_gbs` (e.g. the vendor's peak:
H100 SXM 3,350, H200 4,800), else measured here by copying a 256 MB buffer (`harness.measure_memory_bandwidth`).
Writes `decode.json` and prints a table with each row's ratio to `llama eager` and to Llama's best path.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import CompileConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel

import hf_models  # noqa: F401  (fills the registry)
from hf_models.modeling_zoo_common import few_rows_linear
from hf_models.registry import ArchitectureSpec, get_spec
from training.common import UsageError, run_cli

from .harness import (
    DTYPES,
    MIN_RUNS,
    add_deprecated_override,
    add_set_argument,
    card_command,
    environment,
    environment_line,
    format_table,
    generated_section,
    measure_memory_bandwidth,
    output_folder,
    parse_set,
    positive_ints,
    random_prompts,
    resolve_device,
    time_generation,
    torch_threads,
    write_json,
)

LLAMA = "llama"
LLAMA_FEW_ROWS = "llama-few-rows-head"


class FewRowsHead(nn.Module):
    """The control's LM head: `linear` applied through `few_rows_linear`, as every zoo causal LM applies its own."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return few_rows_linear(self.linear, hidden_states)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="toeplitz_mixer", help="A causal architecture of the registry.")
    add_set_argument(parser, "config fields of --model_type over the registry's default, e.g. --set hidden_size=256")
    add_deprecated_override(parser, "--config_overrides")
    parser.add_argument("--batch_sizes", type=positive_ints, default=[1, 4])
    parser.add_argument("--prompt_lengths", type=positive_ints, default=[1, 256])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled subjects.")
    parser.add_argument("--static", action="store_true", help="Also time the static cache without compilation.")
    parser.add_argument("--no_compile", action="store_true", help="Skip the compiled subjects.")
    parser.add_argument("--no_baseline", action="store_true", help="Skip the Llama baseline.")
    parser.add_argument("--llama_few_rows_head", action="store_true",
                        help=f"Also time the control `{LLAMA_FEW_ROWS}`: the baseline Llama with the zoo's LM-head "
                             "product for a few rows (`few_rows_linear`), which separates that product's gain from "
                             "the architecture's.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth_gbs", type=float, default=None,
                        help="Memory bandwidth of the floor, GB/s (default: measured with a buffer copy).")
    parser.add_argument("--output_dir", default=None, help="Default: results/decode-<model_type>-<timestamp>.")
    return parser


def compile_config(backend: str, device: torch.device) -> CompileConfig:
    """Full-graph, static-shape compilation; CUDA graphs (`reduce-overhead`) on CUDA. `generate` compiles only on
    accelerators unless `_compile_all_devices` is set, the library's switch for CPUs."""
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                           mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True
    return config


def uses_library_static_cache(model: PreTrainedModel) -> bool:
    """Whether `model` decodes with the library's key/value caches and compiles with its `StaticCache`."""
    return bool(getattr(model, "_can_compile_fullgraph", False))


def kv_width(model: PreTrainedModel) -> int:
    """Channels of keys (as many of values) cached per position and layer: `num_kv_heads × head_dim`, or the
    architecture's own static-cache layout (`_get_static_cache_init_shape`, e.g. Nanohead's concatenated heads)."""
    shape = model._get_static_cache_init_shape() if hasattr(model, "_get_static_cache_init_shape") else None
    if shape is not None and all(isinstance(size, int) for size in shape):
        return shape[0] * shape[1]
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads * head_dim


def state_bytes(model: PreTrainedModel, batch: int, positions: float) -> float:
    """Bytes of decoding state one step reads with `positions` cached positions (see the module docstring)."""
    config = model.config
    element = next(model.parameters()).element_size()
    layers, hidden = config.num_hidden_layers, config.hidden_size
    if config.model_type == "toeplitz_mixer":
        return layers * batch * hidden * positions * element
    if config.model_type == "bicameral_lm":  # per layer: the ring of inputs, a row of kernel taps, the time taps
        ring = max(config.kernel_len, config.time_kernel_size)
        return layers * (batch * ring * hidden + ring + config.time_kernel_size * hidden) * element
    return 2 * layers * batch * kv_width(model) * positions * element


def weight_bytes(model: PreTrainedModel, batch: int, auxiliary: tuple[str, ...] = ()) -> float:
    """Bytes of the weights one decode step reads: every parameter (tied ones once) except the parameters under the
    `auxiliary` name prefixes and, for an untied input embedding, all but `batch` of its rows."""
    named = {}
    for name, parameter in model.named_parameters():
        if not name.startswith(auxiliary):
            named.setdefault(id(parameter), parameter)
    total = sum(p.numel() * p.element_size() for p in named.values())
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not output and id(embedding) in named:
        total -= (embedding.shape[0] - batch) * embedding.shape[1] * embedding.element_size()
    return total


def bytes_per_decode_step(model: PreTrainedModel, batch: int, prompt: int, new_tokens: int, *, path: str,
                          auxiliary: tuple[str, ...] = ()) -> float:
    """The bytes a decode step of `model` must read at least, averaged over a decode of `new_tokens` tokens after a
    `prompt`-token prompt, on decode `path` (`"eager"`, `"static"` or `"compiled"`, see the module docstring)."""
    if path == "eager" or (path == "compiled" and model.config.model_type == "bicameral_lm"):
        positions: float = prompt + new_tokens / 2
    elif model.config.model_type == "toeplitz_mixer":
        positions = model.config.max_position_embeddings
    else:
        positions = prompt + new_tokens
    return weight_bytes(model, batch, auxiliary) + state_bytes(model, batch, positions)


def decode_paths(model: PreTrainedModel, compiled: CompileConfig, *, static: bool,
                 compile: bool) -> list[tuple[str, dict[str, Any] | str]]:
    """`(path, generate kwargs)` of each decode path of `model`, or `(path, reason)` where it has none."""
    library_static = uses_library_static_cache(model)
    paths: list[tuple[str, dict[str, Any] | str]] = [("eager", {})]
    if static:
        paths.append(("static", {"cache_implementation": "static"} if library_static else
                      "no library static cache (the architecture decodes with its own cache)"))
    if compile:
        kwargs: dict[str, Any] = {"compile_config": compiled}
        if library_static:
            kwargs["cache_implementation"] = "static"
        paths.append(("compiled", kwargs))
    return paths


def measure_path(model: PreTrainedModel, name: str, path: str, kwargs: dict[str, Any], *, batch: int, prompt: int,
                 new_tokens: int, warmup: int, runs: int, seed: int, bandwidth_gbs: float,
                 auxiliary: tuple[str, ...] = ()) -> dict[str, Any]:
    """One row: the decode of `new_tokens` tokens after a random `prompt` of `batch` rows on `path`.

    A compiled path that `generate` did not compile (the architecture's cache is not compileable), or a path that
    fails (e.g. its compilation), returns a row with `unavailable` (the reason) and no figures."""
    row: dict[str, Any] = {"subject": f"{name} {path}", "model": name, "path": path, "batch_size": batch,
                           "prompt_length": prompt, "new_tokens": new_tokens}
    input_ids = random_prompts(model.config.vocab_size, batch, prompt, device=model.device, seed=seed)
    if path == "compiled" and hasattr(model, "_compiled_call"):
        del model._compiled_call  # so that the check below sees this path's own compilation
    try:
        result = time_generation(model, input_ids, new_tokens=new_tokens, use_cache=True, mode_kwargs=kwargs,
                                 warmup=warmup, runs=runs)
    except Exception as error:  # noqa: BLE001  (e.g. a compiler error: a finding of the benchmark, reported)
        row["unavailable"] = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        return row
    if path == "compiled" and not hasattr(model, "_compiled_call"):
        row["unavailable"] = "no shape-static decode path yet (generate decoded eagerly: the cache is not compileable)"
        return row
    prefill = time_generation(model, input_ids, new_tokens=1, use_cache=True, mode_kwargs=kwargs, warmup=warmup,
                              runs=runs)
    step_seconds = (result["median_s"] - prefill["median_s"]) / (new_tokens - 1)
    floor_bytes = bytes_per_decode_step(model, batch, prompt, new_tokens, path=path, auxiliary=auxiliary)
    floor_seconds = floor_bytes / (bandwidth_gbs * 1e9)
    row.update({"tokens_per_second": result["tokens_per_second"], "ms_per_token": result["ms_per_token"],
                "decode_step_ms": 1000 * step_seconds, "floor_ms": 1000 * floor_seconds,
                "bytes_per_step": floor_bytes,
                "fraction_of_floor": floor_seconds / step_seconds if step_seconds > 0 else None,
                "timing": result, "prefill_timing": prefill})
    return row


def add_llama_ratios(rows: list[dict[str, Any]]) -> None:
    """`vs_llama_eager` and `vs_llama_best` (tokens/s over Llama's eager / fastest path at the same setting)."""
    llama: dict[tuple[int, int], dict[str, float]] = {}
    for row in rows:
        if row["model"] == LLAMA and "tokens_per_second" in row:
            llama.setdefault((row["batch_size"], row["prompt_length"]), {})[row["path"]] = row["tokens_per_second"]
    for row in rows:
        reference = llama.get((row["batch_size"], row["prompt_length"]))
        if reference and "tokens_per_second" in row:
            if "eager" in reference:
                row["vs_llama_eager"] = row["tokens_per_second"] / reference["eager"]
            row["vs_llama_best"] = row["tokens_per_second"] / max(reference.values())


def measure_decode(
    spec: ArchitectureSpec,
    config: PreTrainedConfig,
    *,
    batch_sizes: Sequence[int],
    prompt_lengths: Sequence[int],
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    bandwidth_gbs: float,
    backend: str = "inductor",
    static: bool = False,
    compile: bool = True,
    baseline: bool = True,
    llama_few_rows_head: bool = False,
    warmup: int = 1,
    runs: int = 5,
    seed: int = 0,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows of every batch size × prompt length × subject (eager paths, then compiled, then static, the
    architecture's before Llama's). Rows not started by `deadline` (`time.monotonic()`) are skipped, saying so."""
    if spec.task != "causal-lm":
        raise UsageError(f"{spec.model_type} is not a causal LM (it generates with {spec.generate_method})")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one graph per setting
    compiled = compile_config(backend, device)
    torch.manual_seed(seed)
    subjects = [(spec.model_type, spec.model_class(config), spec.auxiliary_parameters)]
    if baseline and spec.model_type != LLAMA:
        torch.manual_seed(seed)
        subjects.append((LLAMA, LlamaForCausalLM(spec.baseline_config(config)), ()))
    if llama_few_rows_head:
        torch.manual_seed(seed)
        control = LlamaForCausalLM(spec.baseline_config(config))
        control.lm_head = FewRowsHead(control.lm_head)
        subjects.append((LLAMA_FEW_ROWS, control, ()))
    for _, model, _ in subjects:
        model.to(device=device, dtype=dtype).eval()
    # every path at one setting before the next setting, eager paths before compiled before static, the
    # architecture's before Llama's: under a `deadline` the most telling rows come first
    order = {"eager": 0, "compiled": 1, "static": 2}
    jobs = sorted(((name, model, auxiliary, path, kwargs) for name, model, auxiliary in subjects
                   for path, kwargs in decode_paths(model, compiled, static=static, compile=compile)),
                  key=lambda job: order[job[3]])
    reasons = {(name, path): kwargs for name, _, _, path, kwargs in jobs if isinstance(kwargs, str)}
    rows = []
    for batch in batch_sizes:
        for prompt in prompt_lengths:
            for name, model, auxiliary, path, kwargs in jobs:
                reason = reasons.get((name, path))
                if reason is None and deadline is not None and time.monotonic() > deadline:
                    reason = "skipped: the time budget ran out"
                if reason is None:
                    row = measure_path(model, name, path, kwargs, batch=batch, prompt=prompt, new_tokens=new_tokens,
                                       warmup=warmup, runs=runs, seed=seed, bandwidth_gbs=bandwidth_gbs,
                                       auxiliary=auxiliary)
                    if "unavailable" in row:  # not retried at the other settings
                        reasons[(name, path)] = row["unavailable"]
                else:
                    row = {"subject": f"{name} {path}", "model": name, "path": path, "batch_size": batch,
                           "prompt_length": prompt, "new_tokens": new_tokens, "unavailable": reason}
                rows.append(row)
                if "unavailable" in row:
                    log(f"{row['subject']:24s} B={batch} prompt={prompt}: {row['unavailable']}")
                else:
                    log(f"{row['subject']:24s} B={batch} prompt={prompt}: {row['tokens_per_second']:.1f} tok/s, "
                        f"decode step {row['decode_step_ms']:.3f} ms (floor {row['floor_ms']:.4f} ms)")
    for _, model, _ in subjects:
        model.to("cpu")
    add_llama_ratios(rows)
    return rows


COLUMNS = [("subject", "subject"), ("batch_size", "B"), ("prompt_length", "prompt"), ("new_tokens", "new"),
           ("tokens_per_second", "tok/s"), ("ms_per_token", "ms/token"), ("decode_step_ms", "decode ms"),
           ("floor_ms", "floor ms"), ("fraction_of_floor", "floor ÷ step"), ("vs_llama_eager", "÷ llama eager"),
           ("vs_llama_best", "÷ llama best"), ("unavailable", "note")]


CARD_COLUMNS = [*COLUMNS[:-1], ("noisy", "noisy (p90/p10 > 1.5)"), COLUMNS[-1]]


def with_noisy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with `noisy`: whether either timing behind the row's figures (the decode, the prefill-only run) had a
    p90/p10 spread above `NOISY_SPREAD`."""
    return [{**row, "noisy": row["timing"]["noisy"] or row["prefill_timing"]["noisy"]} if "timing" in row else row
            for row in rows]


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The model card's decode section of one run, generated from its `decode.json` report."""
    settings = report["settings"]
    rows = with_noisy(report["rows"])
    header = (f"{environment_line(report['environment'])}; greedy decoding of {settings['new_tokens']} tokens after "
              f"{settings['prompts']}, median of {settings['runs']} runs after {settings['warmup']} warm-up; compiled "
              f"rows: `{settings['backend']}` backend; floor at {report['bandwidth_gbs']:.1f} GB/s "
              f"({report['bandwidth_source']}).")
    return generated_section("decode", json_path, header, format_table(rows, CARD_COLUMNS, markdown=True),
                             summary_line(report))


def best_rates(rows: list[dict[str, Any]], model: str) -> dict[tuple[int, int], float]:
    """Per `(batch, prompt)` setting, the tokens/s of `model`'s fastest path."""
    best: dict[tuple[int, int], float] = {}
    for row in rows:
        if row["model"] == model and "tokens_per_second" in row:
            key = (row["batch_size"], row["prompt_length"])
            best[key] = max(best.get(key, 0.0), row["tokens_per_second"])
    return best


def summary_line(report: dict[str, Any]) -> str:
    """The run's findings: per setting the subject's best path against Llama's best (and against the control's,
    `--llama_few_rows_head`), and the compiled steps' fraction of the floor (ranges over the settings)."""
    rows, model = report["rows"], report["model_type"]
    subject = [row for row in rows if row["model"] == model and "tokens_per_second" in row]
    best = best_rates(rows, model)
    parts = []
    for reference, label in ((LLAMA, "Llama's best path"), (LLAMA_FEW_ROWS, f"`{LLAMA_FEW_ROWS}`'s best path")):
        theirs = best_rates(rows, reference)
        ratios = [best[key] / theirs[key] for key in best if key in theirs]
        if ratios and model != reference:
            parts.append(f"{model}'s best path ÷ {label}: {min(ratios):.2f}–{max(ratios):.2f} over the "
                         f"{len(ratios)} settings")
    floors = [row["fraction_of_floor"] for row in subject if row["path"] == "compiled" and row.get("fraction_of_floor")]
    if floors:
        parts.append(f"compiled steps at {min(floors):.0%}–{max(floors):.0%} of the floor")
    return ("; ".join(parts) + ".") if parts else "No figures for the subject in this run."


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if card_command(argv, "decode", card_block):  # python -m benchmarks.decode card <decode.json>
        return None
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2 or args.runs < MIN_RUNS or args.warmup < 1:
        raise UsageError(f"--new_tokens must be >= 2 (the decode step is timed against a 1-token run), --runs >= "
                         f"{MIN_RUNS} and --warmup >= 1 (the compilation)")
    if args.bandwidth_gbs is not None and args.bandwidth_gbs <= 0:
        raise UsageError("--bandwidth_gbs must be > 0")
    try:
        spec = get_spec(args.model_type)
        config = spec.make_config(parse_set(args.set))
    except ValueError as error:
        raise UsageError(" ".join(str(error).split())) from None
    with torch_threads(args.threads):
        return run(args, spec, config)


def run(args: argparse.Namespace, spec: ArchitectureSpec, config: PreTrainedConfig) -> dict[str, Any]:
    """The benchmark with parsed arguments, of `config` (see the module docstring)."""
    context = config.max_position_embeddings
    too_long = [p for p in args.prompt_lengths if p + args.new_tokens > context]
    if too_long:
        raise UsageError(f"prompt lengths {too_long} + --new_tokens {args.new_tokens} exceed the context {context}")
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    bandwidth = args.bandwidth_gbs or measure_memory_bandwidth(device)
    rows = measure_decode(spec, config, batch_sizes=args.batch_sizes, prompt_lengths=args.prompt_lengths,
                          new_tokens=args.new_tokens, device=device, dtype=dtype, bandwidth_gbs=bandwidth,
                          backend=args.backend, static=args.static, compile=not args.no_compile,
                          baseline=not args.no_baseline, llama_few_rows_head=args.llama_few_rows_head,
                          warmup=args.warmup, runs=args.runs, seed=args.seed)
    report = {
        "model_type": spec.model_type,
        "config": config.to_diff_dict(),
        "settings": {"new_tokens": args.new_tokens, "warmup": args.warmup, "runs": args.runs, "greedy": True,
                     "backend": args.backend, "compile_config": compile_config(args.backend, device).to_dict(),
                     "prompts": f"random token ids, seed {args.seed}",
                     "llama_few_rows_head": args.llama_few_rows_head},
        "environment": environment(device, dtype),
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": "--bandwidth_gbs" if args.bandwidth_gbs else "measured (256 MB buffer copy)",
        "rows": rows,
    }
    output_dir = output_folder(args.output_dir, "decode", spec.model_type)
    write_json(output_dir / "decode.json", report)
    print(format_table(with_noisy(rows), CARD_COLUMNS))
    env = report["environment"]
    print(f"\n{env['device_name']}, {env['dtype']}, torch {env['torch']}, {env['torch_threads']} threads; median of "
          f"{args.runs} runs after {args.warmup} warm-up; floor at {bandwidth:.1f} GB/s ({report['bandwidth_source']}); "
          f"wrote {output_dir}/decode.json")
    return report


if __name__ == "__main__":
    run_cli(main)
