"""Confidence-parallel masked-diffusion decoding with the approximate block cache against same-size Llama greedy
decoding, at matched generative perplexity, in one run.

    python -m benchmarks.diffusion_decode --preset smoke     # ~15 minutes on one CPU core

Steps:
1. Train the masked diffusion LM and a same-size Llama on the same blocks exactly as `benchmarks.sampler_coherence`
   does (its `prepare_data` / `train_models` and preset), and a second Llama of the same size with another seed as
   the reference (the scorer): the Llama that is timed does not score its own text.
2. Decode `new_tokens` tokens after `num_prompts` validation prompts of `prompt_tokens` tokens, greedily
   (temperature 0): the Llama with `generate` (its key/value cache), the diffusion model with naive one-token steps,
   left-to-right, and confidence-threshold decoding at each of `thresholds` over the whole continuation, in blocks
   of `decode_block_size` without cache and in blocks with the approximate cache (`use_prefix_cache`, see
   `hf_models/masked_diffusion/decoding.py`).
3. Per setting: tokens/s of the whole batch (median of `runs` timed calls after a warm-up, `benchmarks.harness`),
   model calls and positions processed per token, and the quality of the samples: reference NLL (generative
   perplexity) with entropy, distinct-n and the unseen-bigram rate (`sampler_coherence.summarise`). For each
   cached setting, what the approximation changes: the share of generated tokens that differ from the same setting
   without the cache and the paired reference-NLL difference.
4. Verdict: a diffusion setting "matches" the Llama when its reference NLL is not worse than the Llama's by more
   than 2 standard errors of the paired difference over prompts; among those, the fastest against the Llama.

Writes `diffusion_decode.json` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hf_models.registry import get_spec
from training.common import UsageError, run_cli

from . import sampler_coherence
from .harness import add_deprecated_settings, add_preset_argument, add_set_argument, apply_settings, environment, \
    format_table, output_folder, positive_floats, resolve_device, time_generation, torch_threads, write_json

INT_SETTINGS = ("decode_block_size", "runs", *sampler_coherence.INT_SETTINGS)
PRESETS: dict[str, dict[str, Any]] = {
    # The models of sampler_coherence's smoke preset (same data, sizes, schedule and seed), greedy decoding of 64
    # tokens after 32 prompts of 16; one torch thread (see sampler_coherence).
    "smoke": dict(sampler_coherence.PRESETS["smoke"], thresholds=[0.9, 0.7, 0.5], decode_block_size=16,
                  runs=5),
}


def diffusion_settings(settings: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, `diffusion_generate` options) of every diffusion setting measured."""
    new_tokens, block = settings["new_tokens"], settings["decode_block_size"]
    rows = [("naive, 1 token/step", dict(sampler="naive", steps=new_tokens)),
            ("left-to-right", dict(sampler="left_to_right", steps=new_tokens))]
    for tau in settings["thresholds"]:
        rows += [(f"threshold {tau}", dict(sampler="threshold", threshold=tau)),
                 (f"threshold {tau}, blocks of {block}", dict(sampler="threshold", threshold=tau, block_size=block)),
                 (f"threshold {tau}, blocks of {block}, cache",
                  dict(sampler="threshold", threshold=tau, block_size=block, use_prefix_cache=True))]
    return rows


def run_decoding(models: dict[str, Any], scorer: torch.nn.Module, data: dict[str, Any], settings: dict[str, Any],
                 device: torch.device) -> list[dict[str, Any]]:
    prompt_length, new_tokens = settings["prompt_tokens"], settings["new_tokens"]
    prompts = data["prompt_blocks"][:, :prompt_length].to(device)
    seen = sampler_coherence.bigram_set(data["train"].blocks["input_ids"])
    llama, diffusion = models["reference"].to(device), models["diffusion"].to(device)
    scorer.to(device)
    jobs: list[tuple[str, Any, str, dict[str, Any]]] = [("llama greedy (KV cache)", llama, "generate", {})]
    jobs += [(name, diffusion, "diffusion_generate", dict(options, temperature=0))
             for name, options in diffusion_settings(settings)]
    rows = []
    for name, model, method, options in tqdm(jobs, desc="decoding", unit="setting"):
        timing = time_generation(model, prompts, new_tokens=new_tokens, use_cache=True if method == "generate" else
                                 None, method=method, mode_kwargs=options, warmup=1, runs=settings["runs"])
        with torch.no_grad():
            if method == "generate":
                sequences = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                           max_new_tokens=new_tokens, eos_token_id=None,
                                           pad_token_id=model.config.pad_token_id or 0)
                calls = torch.full((len(prompts),), new_tokens)
                processed = torch.full((len(prompts),), prompt_length + new_tokens - 1)
            else:
                output = model.diffusion_generate(prompts, max_new_tokens=new_tokens, return_dict_in_generate=True,
                                                  **options)
                sequences, calls, processed = output.sequences, output.num_model_calls, output.num_tokens_processed
        row = sampler_coherence.summarise(name, None, sequences, prompt_length, seen, scorer)
        row.update(options=options, tokens_per_second=timing["tokens_per_second"],
                   timing=timing, model_calls_per_token=calls.float().mean().item() / new_tokens,
                   positions_processed_per_token=processed.float().mean().item() / new_tokens,
                   sequences=sequences[:, prompt_length:].tolist())
        rows.append(row)
    llama_row = rows[0]
    by_name = {row["method"]: row for row in rows}
    for row in rows[1:]:
        row["speed_vs_llama"] = row["tokens_per_second"] / llama_row["tokens_per_second"]
        row["nll_vs_llama"], row["nll_vs_llama_se"] = sampler_coherence.compare(row, llama_row, "reference_nll")
        uncached = by_name.get(row["method"].removesuffix(", cache"))
        if row["options"].get("use_prefix_cache") and uncached is not None:
            differ = torch.tensor(row["sequences"]) != torch.tensor(uncached["sequences"])
            row["cache_tokens_changed"] = differ.float().mean().item()
            row["cache_nll_change"], row["cache_nll_change_se"] = sampler_coherence.compare(row, uncached,
                                                                                            "reference_nll")
            row["cache_speedup"] = row["tokens_per_second"] / uncached["tokens_per_second"]
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    llama, diffusion = rows[0], rows[1:]
    matched = [row for row in diffusion if row["nll_vs_llama"] <= 2 * row["nll_vs_llama_se"]]
    head = (f"Llama greedy: {llama['tokens_per_second']:.0f} tokens/s, reference NLL {llama['reference_nll']:.3f} "
            f"± {llama['reference_nll_se']:.3f}, entropy {llama['entropy']:.2f}. ")
    if matched:
        best = max(matched, key=lambda row: row["tokens_per_second"])
        return head + (f"{len(matched)} diffusion setting(s) match its generative perplexity (not worse by more than "
                       f"2 SE); the fastest, {best['method']}, runs at {best['speed_vs_llama']:.2f}x the Llama "
                       f"(NLL {best['nll_vs_llama']:+.3f} ± {best['nll_vs_llama_se']:.3f}).")
    closest = min(diffusion, key=lambda row: row["nll_vs_llama"])
    fastest = max(diffusion, key=lambda row: row["tokens_per_second"])
    return head + (f"No diffusion setting matches its generative perplexity: the closest, {closest['method']}, is "
                   f"{closest['nll_vs_llama']:+.3f} ± {closest['nll_vs_llama_se']:.3f} nats/token worse at "
                   f"{closest['speed_vs_llama']:.2f}x its speed; the fastest, {fastest['method']}, runs at "
                   f"{fastest['speed_vs_llama']:.2f}x, {fastest['nll_vs_llama']:+.3f} nats/token worse.")


CARD_COLUMNS = [("method", "decoding (greedy)"), ("tokens_per_second", "tokens/s"), ("speed_vs_llama", "÷ Llama"),
                ("model_calls_per_token", "calls / token"), ("positions_processed_per_token", "positions / token"),
                ("reference_perplexity", "ref. perplexity"), ("nll_vs_llama", "NLL − Llama"),
                ("nll_vs_llama_se", "± se"), ("entropy", "entropy"), ("distinct_2", "distinct-2"),
                ("cache_tokens_changed", "tokens changed by the cache"),
                ("cache_nll_change", "NLL change by the cache"),
                ("cache_nll_change_se", "± se"), ("cache_speedup", "cache speed-up")]


def card_table(report: dict[str, Any]) -> str:
    """The Markdown table of the model card, generated from a `diffusion_decode.json` report."""
    return format_table(report["rows"], CARD_COLUMNS, markdown=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields, e.g. --set thresholds=[0.9,0.5],decode_block_size=8")
    add_deprecated_settings(parser, {**dict.fromkeys(INT_SETTINGS, int), "thresholds": positive_floats})
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output_dir", default=None, help="Default: results/diffusion_decode-<preset>-<timestamp>.")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = apply_settings(PRESETS[args.preset], args.set)
    if settings["new_tokens"] % settings["decode_block_size"]:
        raise UsageError(f"decode_block_size {settings['decode_block_size']} must divide new_tokens "
                         f"{settings['new_tokens']}")
    if settings["num_prompts"] < 2 or settings["prompt_tokens"] + settings["new_tokens"] > settings["block_size"]:
        raise UsageError("num_prompts must be >= 2 and prompt_tokens + new_tokens <= block_size")
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    with torch_threads(settings["threads"]):
        return run(args, settings)


def run(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    device = resolve_device(args.device)
    output_dir = output_folder(args.output_dir, "diffusion_decode", args.preset)
    data = sampler_coherence.prepare_data(settings)
    with tempfile.TemporaryDirectory() as checkpoints:
        try:
            models = sampler_coherence.train_models(settings, data, device, Path(checkpoints), args.seed)
        except ValueError as error:
            raise UsageError(str(error)) from None
        scorer, scorer_seconds, scorer_eval = sampler_coherence.train_reference(
            settings, data, get_spec("masked_diffusion_lm").baseline_config(models["diffusion"].config), device,
            Path(checkpoints) / "scorer", args.seed + 1)
    rows = run_decoding(models, scorer, data, settings, device)
    summary = verdict(rows)
    report = {
        "experiment": "diffusion_decode", "preset": args.preset,
        "settings": {**settings, "train_file": data["train_file"], "seed": args.seed, "temperature": 0},
        "training": {**models["report"], "scorer_eval_nll": scorer_eval, "scorer_train_seconds": scorer_seconds,
                     "scorer_seed": args.seed + 1},
        "environment": environment(device, torch.float32),
        "rows": [{key: value for key, value in row.items() if key not in ("per_prompt", "sequences")} for row in rows],
        "verdict": summary,
    }
    write_json(output_dir / "diffusion_decode.json", report)
    print(format_table(report["rows"], CARD_COLUMNS))
    print(f"\n{card_table(report)}\n\nverdict: {summary}\nwrote {output_dir}/diffusion_decode.json")
    return report


if __name__ == "__main__":
    run_cli(main)
