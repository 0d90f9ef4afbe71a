"""The sampler-coherence experiment of the masked diffusion LM: does wavefront sampling with the sampler head (and
critic-guided remasking) make parallel un-masking locally more coherent, and at what speed?

    python -m benchmarks.sampler_coherence --preset smoke     # ~10 min per seed on one CPU core, 3 seeds
    python -m benchmarks.sampler_coherence --preset medium    # 2.9M parameters, ~25 min per seed, 3 seeds
    python -m benchmarks.sampler_coherence --preset original  # larger model and sample, the original's stages (GPU)

Steps:
1. Fit a BPE tokenizer on the training documents and pack them (the foundation's data pipeline).
2. Train the masked diffusion LM (sampler + critic heads, staged: main loss from step 0 (in the smoke preset after
   a BERT-style warm-up: `mask_warmup_steps` at the fixed rate `mask_warmup_rate` on sub-blocks of
   `mask_warmup_block` tokens, see training/diffusion.py), sampler loss from
   `start_sampler_step`, critic loss from `start_critic_step`, ramped until `end_critic_step`) with
   `DiffusionTrainer`, and a same-size Llama (the zoo's causal baseline) on the same blocks with its own trainer, as
   the reference model. Report both validation losses (the diffusion one is an NLL bound).
3. Prompts: the first `prompt_tokens` tokens of validation blocks. For every sampler (naive, naive+critic,
   wavefront, wavefront+critic, and the controls left-to-right (the leftmost masks first, main head: no selection
   among draws) at each step count, and confidence-threshold decoding (Fast-dLLM) at each of `THRESHOLDS`, whose
   number of model calls follows from the threshold), generate `new_tokens` tokens for all prompts in one batch
   (temperature and top-p fixed, the training seed as the sampling seed), and measure on the generated tokens:
   * unseen-bigram rate: share of adjacent token pairs (the first paired with the prompt's last token) that never
     occur in the training tokens: local incoherence;
   * repetition rate: share of tokens equal to the previous one;
   * distinct-1/2/3: distinct n-grams / n-grams over all samples of the setting (diversity);
   * entropy: the unigram entropy (nats) of each sample's tokens, averaged (low: repetitive, bland text; generative
     perplexity alone rewards blandness);
   * model calls: trunk passes per sample (the step count, or what the threshold needed);
   * reference perplexity: exp of the mean NLL of the generated tokens under the Llama, given the prompt;
   * tokens/s: batch x new tokens / wall-clock seconds of the generation call (after one warm-up call);
   * tokens re-masked by the critic.
   The validation blocks' real continuations get the same text metrics (the "real text" line).
4. Steps 2-3 run once per training seed (`seeds`, from `--seed` on: the models' initialisation, data order and
   the sampling seed; one tokenizer and one data split for all).
5. Verdict: at each step count, wavefront vs naive and critic vs no critic, in unseen-bigram rate and reference
   NLL, against twice the standard error of the difference; the controls: left-to-right vs naive
   and wavefront vs left-to-right at each step count, and each threshold against naive and left-to-right at the
   smallest step count with at least its mean number of calls (in every seed, so the control is never given fewer
   calls), in reference NLL, unseen bigrams and entropy. With two or more seeds the report's table and verdicts
   are over seeds (each seed's mean over prompts is one value; paired by seed); each seed's own verdicts, paired
   over prompts, stay in its `runs` entry. With one seed they are over prompts.

`python -m benchmarks.sampler_coherence card <sampler_coherence.json>` writes the run's section of the model card
from the JSON (the folder name names the section, e.g. `model_cards/results/sampler_coherence/smoke/`).
`python -m benchmarks.sampler_coherence merge <output_dir> <json> <json> ...` joins runs of the same settings with
different seeds (e.g. one per core) into the report one run of all their seeds would have written.

Any setting of the preset changes with `--set`, e.g. `--set max_steps=200,step_counts=[8,16]`. Writes
`sampler_coherence.json` and `sampler_coherence.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedModel, TrainingArguments, set_seed

import hf_models  # noqa: F401  (fills the registry)
from hf_models.masked_diffusion import MaskedDiffusionForMaskedLM
from hf_models.registry import get_spec
from training.common import UsageError, run_cli
from training.diffusion import DiffusionTrainer
from training.train import config_for_tokenizer
from training.trainer import resolve_trainer

from .harness import add_deprecated_settings, add_preset_argument, add_set_argument, apply_settings, card_markers, \
    environment, figure_title, format_table, hardware, mean_and_se, output_folder, positive_floats, positive_ints, \
    prepare_corpus, pyplot, resolve_device, run_section, save_figure, torch_threads, training_arguments, \
    update_card_from_json, write_json

METHODS = {
    "naive": dict(sampler="naive", use_critic=False),
    "naive+critic": dict(sampler="naive", use_critic=True),
    "wavefront": dict(sampler="wavefront", use_critic=False),
    "wavefront+critic": dict(sampler="wavefront", use_critic=True),
    "left_to_right": dict(sampler="left_to_right"),
}
THRESHOLDS = (0.9, 0.7, 0.5, 0.3)  # confidence thresholds of the "threshold" arm (model calls follow from each)
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.2M-parameter models, 32 prompts x 64 new tokens: about 10 minutes on one CPU core. The diffusion model gets
    # 1,200 steps of 16 x 128 tokens, the Llama 400. A masked LM of this size sits on a unigram plateau (bound ~5.8
    # nats, the corpus's unigram entropy 5.79) until attention learns to find a [MASK] position's neighbours; with
    # the spec's ELBO objective from step 0 that took ~600 steps (and the 1,200-step run ended near 5.74), so the
    # smoke preset starts with a BERT-style warm-up: 300 steps at a fixed 15 % mask rate on 32-token sub-blocks
    # (`mask_warmup_*`, see training/diffusion.py; measured with benchmarks/diffusion_plateau.py), then the ELBO
    # objective on whole 128-token blocks. The original preset keeps the spec's objective (no warm-up).
    # One torch thread: on a shared 2-core machine, small multi-threaded kernels mostly measure OpenMP threads
    # waiting for a busy core (10x slower generation measured here with 2 threads while another job ran).
    # Three training seeds, one after the other: about 10 minutes each on one Xeon core.
    "smoke": dict(train_file="tinystories_valid_sample.txt", vocab_size=1024, block_size=128, hidden_size=128,
                  num_hidden_layers=4, num_attention_heads=4, batch_size=16, max_steps=1200, reference_max_steps=400,
                  learning_rate=2e-3, start_sampler_step=300, start_critic_step=600, end_critic_step=900,
                  mask_warmup_steps=300, mask_warmup_rate=0.15, mask_warmup_block=32, max_train_documents=None,
                  max_eval_blocks=64, num_prompts=32, prompt_tokens=16, new_tokens=64, step_counts=[8, 16, 32, 64],
                  temperature=1.0, top_p=0.9, threads=1, seeds=3),
    # The original's stage schedule (main only to 1,000; + sampler; + critic from 3,000, full weight at 5,000), a
    # 256-wide 6-layer model, 128 new tokens, 128 prompts. Meant for a GPU.
    "original": dict(train_file="tinystories_valid_sample.txt", vocab_size=4096, block_size=256, hidden_size=256,
                 num_hidden_layers=6, num_attention_heads=8, batch_size=32, max_steps=6000, reference_max_steps=6000,
                 learning_rate=1e-3,
                 start_sampler_step=1000, start_critic_step=3000, end_critic_step=5000, mask_warmup_steps=0,
                 mask_warmup_rate=0.15, mask_warmup_block=0, max_train_documents=None,
                 max_eval_blocks=256, num_prompts=128, prompt_tokens=32, new_tokens=128,
                 step_counts=[8, 16, 32, 64, 128], temperature=1.0, top_p=0.9, threads=None, seeds=3),
}
# The smoke recipe on a larger trunk, trained longer: 192 wide (2.9M parameters with the sampler and critic heads),
# 2,000 diffusion steps (the same 300-step warm-up, the sampler from 500, the critic from 1,000, full weight at
# 1,500), the Llama 600. Sized for the CPU (about 25 minutes per seed on one core); the corpus (~240k training
# tokens) is what limits a larger model here.
PRESETS["medium"] = {**PRESETS["smoke"], "hidden_size": 192, "max_steps": 2000, "reference_max_steps": 600,
                     "start_sampler_step": 500, "start_critic_step": 1000, "end_critic_step": 1500}
# One point at ~25M parameters on an H200 in about a minute (benchmarks.gpu_campaign; sized by estimate, not yet
# measured on a GPU): 512 wide, 8 layers, 600 steps of 64 x 256 tokens with the smoke preset's mask warm-up and the
# original's stage order compressed, 64 prompts; one seed to fit the campaign's minutes (verdicts over prompts).
PRESETS["gpu"] = {**PRESETS["original"], "hidden_size": 512, "num_hidden_layers": 8, "batch_size": 64,
                  "max_steps": 600, "reference_max_steps": 300, "start_sampler_step": 150,
                  "start_critic_step": 300, "end_critic_step": 450, "mask_warmup_steps": 150,
                  "mask_warmup_block": 32, "num_prompts": 64, "step_counts": [16, 32, 64, 128], "seeds": 1}
INT_SETTINGS = ("threads", "seeds", "vocab_size", "block_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "batch_size", "max_steps", "reference_max_steps", "start_sampler_step", "start_critic_step",
                "end_critic_step", "mask_warmup_steps", "mask_warmup_block", "max_train_documents",
                "max_eval_blocks", "num_prompts", "prompt_tokens", "new_tokens")
FLOAT_SETTINGS = ("learning_rate", "mask_warmup_rate", "temperature", "top_p")
WARMUP_SETTINGS = ("mask_warmup_steps", "mask_warmup_rate", "mask_warmup_block")  # DiffusionObjective's options


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def bigram_set(token_rows: Sequence[Sequence[int]]) -> set[tuple[int, int]]:
    """Every adjacent token pair of `token_rows`."""
    return {(row[i], row[i + 1]) for row in token_rows for i in range(len(row) - 1)}


def text_metrics(prompt_last: int, generated: Sequence[int], seen: set[tuple[int, int]]) -> dict[str, float]:
    """Unseen-bigram and repetition rates of one generated continuation (the first token paired with
    `prompt_last`)."""
    tokens = [prompt_last, *generated]
    pairs = list(zip(tokens[:-1], tokens[1:]))
    return {
        "unseen_bigram_rate": sum(pair not in seen for pair in pairs) / len(pairs),
        "repeat_rate": sum(a == b for a, b in pairs) / len(pairs),
    }


def distinct_ngrams(rows: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / n-grams over all `rows`."""
    grams = [tuple(row[i:i + n]) for row in rows for i in range(len(row) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of `tokens`."""
    counts = Counter(tokens)
    return -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())


@torch.no_grad()
def reference_nll(model: PreTrainedModel, sequences: torch.Tensor, prompt_length: int,
                  batch_size: int = 32) -> list[float]:
    """Mean NLL (nats) per row of the tokens after `prompt_length` under a causal `model`."""
    model.eval()
    values = []
    for start in range(0, sequences.shape[0], batch_size):
        rows = sequences[start:start + batch_size]
        logits = model(input_ids=rows).logits[:, prompt_length - 1:-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), rows[:, prompt_length:], reduction="none")
        values.extend(nll.mean(dim=1).tolist())
    return values


def summarise(name: str, steps: int | None, sequences: torch.Tensor, prompt_length: int, seen: set,
              reference: PreTrainedModel) -> dict[str, Any]:
    """Per-prompt and aggregate metrics of one setting's `sequences` `(prompts, prompt + new)`."""
    rows = sequences.tolist()
    per_prompt = [{**text_metrics(row[prompt_length - 1], row[prompt_length:], seen),
                   "entropy": unigram_entropy(row[prompt_length:])} for row in rows]
    nll = reference_nll(reference, sequences, prompt_length)
    result: dict[str, Any] = {"method": name, "steps": steps}
    for key in ("unseen_bigram_rate", "repeat_rate", "entropy"):
        result[key], result[f"{key}_se"] = mean_and_se([m[key] for m in per_prompt])
    result["reference_nll"], result["reference_nll_se"] = mean_and_se(nll)
    result["reference_perplexity"] = math.exp(result["reference_nll"])
    for n in (1, 2, 3):
        result[f"distinct_{n}"] = distinct_ngrams([row[prompt_length:] for row in rows], n)
    result["per_prompt"] = {"unseen_bigram_rate": [m["unseen_bigram_rate"] for m in per_prompt], "reference_nll": nll,
                            "entropy": [m["entropy"] for m in per_prompt]}
    return result


# The units a comparison pairs over: each row's values per prompt (one seed's run) or per seed (`over_seeds`).
UNITS = {"prompts": "per_prompt", "seeds": "per_seed"}


def compare(a: dict[str, Any], b: dict[str, Any], key: str, unit: str = "prompts") -> tuple[float, float]:
    """Mean paired difference a - b of `key` over `unit` (prompts or seeds) and its standard error."""
    diffs = [x - y for x, y in zip(a[UNITS[unit]][key], b[UNITS[unit]][key], strict=True)]
    return mean_and_se(diffs)


def significant(diff: float, se: float) -> bool:
    """Beyond 2 standard errors, with a standard error to compare with (one unit has none)."""
    return se > 0 and abs(diff) > 2 * se


def verdict(rows: list[dict[str, Any]], step_counts: Sequence[int], unit: str = "prompts") -> tuple[list[str], str]:
    """Paired comparisons over `unit` (difference beyond 2 standard errors = significant) and a one-line verdict.

    Both measures are counted: a sampler that repeats one frequent token lowers the unseen-bigram rate while its
    text gets less likely under the reference model, so neither measure alone decides.
    """
    by_key = {(row["method"], row["steps"]): row for row in rows}
    lines: list[str] = []
    tally = {(group, key): [0, 0] for group in ("wavefront", "critic")
             for key in ("unseen_bigram_rate", "reference_nll")}
    pairs = [("wavefront", "naive"), ("naive+critic", "naive"), ("wavefront+critic", "wavefront")]
    for steps in step_counts:
        for treated, control in pairs:
            if (treated, steps) not in by_key or (control, steps) not in by_key:
                continue
            parts = []
            for key, label in (("unseen_bigram_rate", "unseen bigrams"), ("reference_nll", "ref NLL")):
                diff, se = compare(by_key[(treated, steps)], by_key[(control, steps)], key, unit)
                beyond = significant(diff, se)
                parts.append(f"{label} {diff:+.4f} ± {se:.4f}" + (" *" if beyond else ""))
                if beyond:
                    tally[("wavefront" if treated == "wavefront" else "critic", key)][diff > 0] += 1
            lines.append(f"{steps} steps, {treated} vs {control}: " + ", ".join(parts))
    total = sum(1 for s in step_counts if ("wavefront", s) in by_key)

    def counts(group: str, key: str) -> str:
        lower, higher = tally[(group, key)]
        return f"lowers {'the unseen-bigram rate' if key == 'unseen_bigram_rate' else 'the reference NLL'} " \
               f"significantly in {lower} (raises it in {higher})"

    summary = (f"wavefront vs naive ({total} step counts): {counts('wavefront', 'unseen_bigram_rate')}, "
               f"{counts('wavefront', 'reference_nll')}; critic remasking ({2 * total} comparisons): "
               f"{counts('critic', 'unseen_bigram_rate')}, {counts('critic', 'reference_nll')} "
               f"(significant = beyond 2 standard errors of the paired difference over {unit})")
    return lines, summary


CONTROL_MEASURES = (("reference_nll", "ref NLL"), ("unseen_bigram_rate", "unseen bigrams"), ("entropy", "entropy"))


def matched_steps(calls: float, step_counts: Sequence[int]) -> int:
    """The smallest step count with at least `calls` model calls (the largest if none has)."""
    return min((s for s in step_counts if s >= calls), default=max(step_counts))


def control_verdict(rows: list[dict[str, Any]], step_counts: Sequence[int],
                    unit: str = "prompts") -> tuple[list[str], str]:
    """The controls, paired over `unit` (prompts or seeds) in reference NLL, unseen bigrams and entropy
    (significant = beyond 2 standard errors): left-to-right vs naive and wavefront vs left-to-right at each step
    count, and each threshold vs naive and vs left-to-right at `matched_steps` of its mean number of calls (over
    seeds: the largest seed's mean, `model_calls_max`)."""
    by_key = {(row["method"], row["steps"]): row for row in rows if row["method"] != "threshold"}
    pairs: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    for steps in step_counts:
        for treated, control in (("left_to_right", "naive"), ("wavefront", "left_to_right")):
            if (treated, steps) in by_key and (control, steps) in by_key:
                pairs.append((f"{steps} steps, {treated} vs {control}", f"{treated} vs {control}",
                              by_key[(treated, steps)], by_key[(control, steps)]))
    for row in (row for row in rows if row["method"] == "threshold"):
        steps = matched_steps(row.get("model_calls_max", row["model_calls"]), step_counts)
        for control in ("naive", "left_to_right"):
            if (control, steps) in by_key:
                pairs.append((f"threshold {row['threshold']} ({row['model_calls']:.1f} calls) vs {control} at "
                              f"{steps} steps", f"threshold vs {control}", row, by_key[(control, steps)]))
    lines, tally = [], {}
    for label, group, treated, control in pairs:
        parts = []
        counts = tally.setdefault(group, {key: [0, 0, 0] for key, _ in CONTROL_MEASURES})
        for key, name in CONTROL_MEASURES:
            diff, se = compare(treated, control, key, unit)
            beyond = significant(diff, se)
            parts.append(f"{name} {diff:+.4f} ± {se:.4f}" + (" *" if beyond else ""))
            counts[key][0] += 1
            if beyond:
                counts[key][1 if diff < 0 else 2] += 1
        lines.append(f"{label}: " + ", ".join(parts))
    summary = "; ".join(
        f"{group} ({counts['reference_nll'][0]} comparisons): " + ", ".join(
            f"{name} lower in {counts[key][1]}, higher in {counts[key][2]}" for key, name in CONTROL_MEASURES)
        for group, counts in tally.items()) + \
        f" (significant = beyond 2 standard errors of the paired difference over {unit})"
    return lines, summary


# Per-setting figures averaged over seeds (`over_seeds`); the first three are also paired by seed in the verdicts.
PAIRED_METRICS = ("unseen_bigram_rate", "reference_nll", "entropy")
SEED_METRICS = (*PAIRED_METRICS, "repeat_rate", "distinct_1", "distinct_2", "distinct_3", "model_calls",
                "tokens_per_second", "remasked_per_sample")


def over_seeds(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per setting (method, steps, threshold) from the rows of each seed's run: `seeds`, the mean and
    standard error over seeds (`<metric>`, `<metric>_se`) of every `SEED_METRICS` entry the rows have (each seed's
    value being its mean over prompts), `reference_perplexity` (exp of the mean NLL), `model_calls_max` (the
    largest seed's mean calls) and `per_seed` (the seeds' values of `PAIRED_METRICS`, in run order, for
    `compare(..., unit="seeds")`).

    Raises:
        ValueError: the runs do not hold the same settings.
    """
    keyed = [{(row["method"], row["steps"], row.get("threshold")): row for row in rows} for rows in runs]
    if any(keys.keys() != keyed[0].keys() for keys in keyed):
        raise ValueError("the seeds' runs hold different settings")
    summary = []
    for setting in keyed[0]:
        rows = [keys[setting] for keys in keyed]
        row: dict[str, Any] = {"method": rows[0]["method"], "steps": rows[0]["steps"],
                               "threshold": rows[0].get("threshold"), "seeds": len(rows)}
        for metric in (m for m in SEED_METRICS if m in rows[0]):
            row[metric], row[f"{metric}_se"] = mean_and_se([r[metric] for r in rows])
        row["reference_perplexity"] = math.exp(row["reference_nll"])
        if "model_calls" in rows[0]:
            row["model_calls_max"] = max(r["model_calls"] for r in rows)
        row["per_seed"] = {metric: [r[metric] for r in rows] for metric in PAIRED_METRICS}
        summary.append(row)
    return summary


CARD_METRICS = [("reference_nll", "ref. NLL (nats)", 3), ("entropy", "entropy (nats)", 3),
                ("unseen_bigram_rate", "unseen bigrams", 3), ("distinct_2", "distinct-2", 2)]


def card_table(report: dict[str, Any]) -> str:
    """The Markdown table of the model card (naive, left-to-right, wavefront and threshold rows, then real text),
    generated from a `sampler_coherence.json` report; "±" is the standard error over the report's `se_over`."""
    order = {"naive": 0, "naive+critic": 1, "left_to_right": 2, "wavefront": 3, "wavefront+critic": 4, "threshold": 5}
    rows = sorted((row for row in report["rows"] if row["method"] in order),
                  key=lambda row: (order[row["method"]], row["steps"] or 0, -(row["threshold"] or 0)))
    lines = ["| sampler | steps | τ | calls / sample | ref. perplexity | " +
             " | ".join(label for _, label, _ in CARD_METRICS) + " | tokens/s |",
             "|---|---|---|---|---|" + "---|" * len(CARD_METRICS) + "---|"]

    def cell(row: dict[str, Any], key: str, digits: int) -> str:
        se = row.get(f"{key}_se")
        return f"{row[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    for row in [*rows, {**report["real_text"], "method": "real continuation"}]:
        calls = f"{row['model_calls']:.1f}" if "model_calls" in row else "—"
        speed = f"{row['tokens_per_second']:,.0f}" if "tokens_per_second" in row else "—"
        lines.append(f"| {row['method']} | {row.get('steps') or '—'} | {row.get('threshold') or '—'} | {calls} | "
                     f"{row['reference_perplexity']:.1f} | " +
                     " | ".join(cell(row, key, digits) for key, _, digits in CARD_METRICS) + f" | {speed} |")
    return "\n".join(lines)


CARD = Path(__file__).resolve().parents[1] / "model_cards" / "masked_diffusion_lm.md"


def wall_time(report: dict[str, Any]) -> str:
    """The run's wall time in words (for a merged report: its parts, run side by side)."""
    parts = report.get("merged_from")
    if not parts:
        return f"{report['wall_seconds'] / 60:.1f} min in all"
    return (f"{len(parts)} parts run side by side (seeds " + " and ".join(
        ", ".join(map(str, part["seeds"])) for part in parts) + f"), the longest {report['wall_seconds'] / 60:.1f} min")


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The run's section of the model card, generated from its JSON: the setting, the table (mean ± SE over
    `se_over`), the paired comparisons and the two verdicts the code wrote."""
    settings, env, runs = report["settings"], report["environment"], report["runs"]
    training = [run["training"] for run in runs]

    def over(key: str, digits: int = 3) -> str:
        mean, se = mean_and_se([t[key] for t in training])
        return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if len(training) > 1 else "")

    begin, end = card_markers(run_section("sampler_coherence", json_path))
    seeds = ", ".join(str(run["seed"]) for run in runs)
    lines = [
        begin.format(json=json_path), "",
        f"Preset `{report['preset']}`, training seeds {seeds} (initialisation, data order and sampling); "
        f"{hardware(env)}, {env['dtype']}; {wall_time(report)}. Corpus "
        f"`{Path(settings['train_file']).name}`, {report['data']['tokenizer']}, blocks of {settings['block_size']}, "
        f"{report['data']['train_tokens']:,} training tokens. Diffusion LM {training[0]['diffusion_parameters']:,} "
        f"parameters ({training[0]['diffusion_trunk_parameters']:,} trunk), {settings['max_steps']} steps of "
        f"{settings['batch_size']} × {settings['block_size']} (mask warm-up {settings['mask_warmup_steps']} steps, "
        f"sampler from {settings['start_sampler_step']}, critic from {settings['start_critic_step']}, full weight at "
        f"{settings['end_critic_step']}); reference Llama {training[0]['reference_parameters']:,} parameters, "
        f"{settings['reference_max_steps']} steps. Validation NLL: diffusion bound {over('diffusion_eval_nll_bound')} "
        f"nats/token, Llama {over('reference_eval_nll')}. {settings['num_prompts']} prompts of "
        f"{settings['prompt_tokens']} tokens, {settings['new_tokens']} new tokens, T = {settings['temperature']}, "
        f"top-p {settings['top_p']}.", "",
        f"Mean ± standard error over {report['se_over']} ({len(runs)} seed(s); each seed's value is its mean over "
        "the prompts). Reference perplexity is exp of the mean reference NLL; tokens/s is the mean over seeds.", "",
        card_table(report), "",
        f"Paired differences (treated − control, ± SE over {report['se_over']}; * beyond 2 SE):", "",
        *(f"- {line}" for line in [*report["comparisons"], *report["control_comparisons"]]), "",
        f"Verdict (code): {report['verdict']}", "", f"Controls (code): {report['control_verdict']}", "", end]
    return "\n".join(lines)


def update_card(json_path: str | Path, card: Path = CARD) -> str:
    """Replace the card's section of the run at `json_path` with the one rendered from it."""
    return update_card_from_json(json_path, run_section("sampler_coherence", json_path), card_block, card=card)


# ----------------------------------------------------------------------------------------------------------------
# Training


def _training_args(settings: dict[str, Any], max_steps: int, output_dir: Path, device: torch.device,
                   seed: int) -> TrainingArguments:
    return training_arguments(
        output_dir, device=device, seed=seed, max_steps=max_steps, per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
        logging_steps=max(1, max_steps // 20), disable_tqdm=False,
    )


def train_models(settings: dict[str, Any], data: dict[str, Any], device: torch.device, output_dir: Path,
                 seed: int) -> dict[str, Any]:
    """Train the masked diffusion LM and the same-size Llama reference on the same blocks."""
    spec = get_spec("masked_diffusion_lm")
    tokenizer = data["tokenizer"]
    config = config_for_tokenizer(spec, tokenizer, {
        "hidden_size": settings["hidden_size"], "num_hidden_layers": settings["num_hidden_layers"],
        "num_attention_heads": settings["num_attention_heads"], "max_position_embeddings": settings["block_size"],
        "add_sampler_head": True, "add_critic_head": True, "start_sampler_step": settings["start_sampler_step"],
        "start_critic_step": settings["start_critic_step"], "end_critic_step": settings["end_critic_step"],
    })
    set_seed(seed)
    diffusion = MaskedDiffusionForMaskedLM(config)
    trainer = DiffusionTrainer.from_cli(
        model=diffusion, tokenizer=tokenizer,
        args=_training_args(settings, settings["max_steps"], output_dir / "diffusion", device, seed),
        train_dataset=data["train"].blocks, eval_dataset=data["eval_blocks"],
        objective_args={key: settings[key] for key in WARMUP_SETTINGS},
        train_texts=data["documents"]["train"],
    )
    start = time.perf_counter()
    trainer.train()
    diffusion_seconds = time.perf_counter() - start
    diffusion_eval = trainer.evaluate()["eval_loss"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    reference, reference_seconds, reference_eval = train_reference(
        settings, data, spec.baseline_config(config), device, output_dir / "reference", seed)
    tokens_per_byte = data["validation"].tokens_per_byte
    return {
        "diffusion": trainer.model.eval(),
        "reference": reference,
        "report": {
            "diffusion_parameters": sum(p.numel() for p in diffusion.parameters()),
            "diffusion_trunk_parameters": sum(p.numel() for p in diffusion.model.parameters()),
            "reference_parameters": sum(p.numel() for p in reference.parameters()),
            "diffusion_eval_nll_bound": diffusion_eval,
            "diffusion_eval_bits_per_byte_bound": diffusion_eval * tokens_per_byte / math.log(2),
            "reference_eval_nll": reference_eval,
            "reference_eval_bits_per_byte": reference_eval * tokens_per_byte / math.log(2),
            "diffusion_train_seconds": diffusion_seconds,
            "reference_train_seconds": reference_seconds,
            "diffusion_log": [{key: entry[key] for key in ("step", "loss", "loss_main", "loss_sampler", "loss_critic",
                                                           "mask_warmup")
                               if key in entry} for entry in logs],
        },
    }


def train_reference(settings: dict[str, Any], data: dict[str, Any], config: Any, device: torch.device,
                    output_dir: Path, seed: int) -> tuple[LlamaForCausalLM, float, float]:
    """Train a Llama of `config` for `reference_max_steps` on the same blocks; returns it (in eval mode), the
    training seconds and the validation NLL."""
    set_seed(seed)
    trainer = resolve_trainer(get_spec("llama")).from_cli(
        model=LlamaForCausalLM(config), tokenizer=data["tokenizer"],
        args=_training_args(settings, settings["reference_max_steps"], output_dir, device, seed),
        train_dataset=data["train"].blocks, eval_dataset=data["eval_blocks"], objective_args={},
        train_texts=data["documents"]["train"],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return trainer.model.eval(), seconds, trainer.evaluate()["eval_loss"]


def prepare_data(settings: dict[str, Any]) -> dict[str, Any]:
    """`prepare_corpus` of the settings, with held-out blocks for the loss and prompt blocks (two halves of the
    validation blocks)."""
    data = prepare_corpus(settings["train_file"], vocab_size=settings["vocab_size"],
                          block_size=settings["block_size"], max_train_documents=settings["max_train_documents"])
    blocks = data["validation"].blocks
    needed = settings["num_prompts"]
    if len(blocks) < 2:
        raise UsageError(f"the validation split fills only {len(blocks)} block(s); use more text or a smaller block")
    # Prompts come from the second half of the validation blocks, the loss is measured on the first half.
    eval_blocks = blocks.select(range(min(settings["max_eval_blocks"], len(blocks) // 2)))
    prompt_blocks = blocks.select(range(len(blocks) // 2, len(blocks)))
    if len(prompt_blocks) < needed:
        raise UsageError(f"num_prompts {needed} exceeds the {len(prompt_blocks)} validation blocks kept for prompts")
    prompt_blocks = torch.tensor(prompt_blocks.select(range(needed))["input_ids"])
    return {**data, "eval_blocks": eval_blocks, "prompt_blocks": prompt_blocks}


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def run_sampling(models: dict[str, Any], data: dict[str, Any], settings: dict[str, Any], device: torch.device,
                 seed: int) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, str]]]:
    diffusion: MaskedDiffusionForMaskedLM = models["diffusion"].to(device)
    reference = models["reference"].to(device)
    tokenizer = data["tokenizer"]
    prompt_length, new_tokens = settings["prompt_tokens"], settings["new_tokens"]
    blocks = data["prompt_blocks"].to(device)
    prompts = blocks[:, :prompt_length]
    seen = bigram_set(data["train"].blocks["input_ids"])
    real = summarise("real text", None, blocks[:, :prompt_length + new_tokens], prompt_length, seen, reference)
    diffusion.diffusion_generate(prompts[:2], max_new_tokens=new_tokens, steps=settings["step_counts"][0], seed=seed,
                                 temperature=settings["temperature"], top_p=settings["top_p"])  # warm-up
    rows, examples = [], []
    jobs = [(name, steps, None) for steps in settings["step_counts"] for name in METHODS]
    jobs += [("threshold", None, threshold) for threshold in settings["thresholds"]]
    for name, steps, threshold in tqdm(jobs, desc="sampling", unit="setting"):
        options = METHODS[name] if threshold is None else dict(sampler="threshold", threshold=threshold)
        start = time.perf_counter()
        output = diffusion.diffusion_generate(
            prompts, max_new_tokens=new_tokens, steps=steps, seed=seed, temperature=settings["temperature"],
            top_p=settings["top_p"], return_dict_in_generate=True, **options,
        )
        seconds = time.perf_counter() - start
        row = summarise(name, steps, output.sequences, prompt_length, seen, reference)
        calls, calls_se = mean_and_se(output.num_model_calls.float().tolist())
        row.update(threshold=threshold, model_calls=calls, model_calls_se=calls_se, batch_model_calls=int(
                   output.num_model_calls.max()), tokens_per_second=prompts.shape[0] * new_tokens / seconds,
                   seconds=seconds, remasked_per_sample=output.num_remasked.float().mean().item())
        rows.append(row)
        examples.append({"method": name if threshold is None else f"threshold {threshold}", "steps": str(steps),
                         "prompt": tokenizer.decode(prompts[0]),
                         "continuation": tokenizer.decode(output.sequences[0, prompt_length:])})
    examples.append({"method": "real text", "steps": "—", "prompt": tokenizer.decode(prompts[0]),
                     "continuation": tokenizer.decode(blocks[0, prompt_length:prompt_length + new_tokens])})
    return rows, real, examples


# ----------------------------------------------------------------------------------------------------------------
# Report


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows, real = report["rows"], report["real_text"]
    panels = [("unseen_bigram_rate", "unseen-bigram rate (lower: more locally coherent)"),
              ("reference_nll", "reference NLL, nats/token (Llama on the same corpus)"),
              ("entropy", "unigram entropy per sample, nats (low: bland)"),
              ("repeat_rate", "immediate repetition rate"),
              ("distinct_2", "distinct-2 over all samples"),
              ("tokens_per_second", "tokens / s")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, label) in zip(axes.flat, panels):
        for index, method in enumerate([*METHODS, "threshold"]):
            points = sorted((row["model_calls"], row[key], row.get(f"{key}_se", 0.0))
                            for row in rows if row["method"] == method)
            if not points:
                continue
            xs, ys, errors = zip(*points)
            ax.errorbar(xs, ys, yerr=errors, fmt="o-" if "critic" not in method else "s--", capsize=3,
                        color=f"C{index}", label=method)
        if key in real:
            ax.axhline(real[key], color="0.3", linestyle=":", label="real text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"model calls (trunk passes) per sample for {report['settings']['new_tokens']} tokens")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=7, loc="best")
    settings = report["settings"]
    parameters = report["runs"][0]["training"]["diffusion_parameters"]
    fig.suptitle(figure_title(f"Masked diffusion sampler coherence: {parameters:,} parameters (Llama "
                              f"{settings['reference_max_steps']} steps), T={settings['temperature']}, "
                              f"top-p={settings['top_p']}, {settings['num_prompts']} prompts, "
                              f"{len(report['runs'])} seed(s), error bars: SE over {report['se_over']}",
                              report["preset"],
                              settings["max_steps"], report["environment"]), fontsize=9)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields (thresholds=[] drops the threshold arm; train_file: a corpus path or a "
                             "file in $HF_ZOO_DATA)")
    add_deprecated_settings(parser, {**dict.fromkeys(INT_SETTINGS, int), **dict.fromkeys(FLOAT_SETTINGS, float),
                                     "step_counts": positive_ints, "thresholds": positive_floats, "train_file": str})
    parser.add_argument("--seed", type=int, default=0, help="the first training seed (then seed + 1, ...)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output_dir", default=None, help="Default: results/sampler_coherence-<preset>-<timestamp>.")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = apply_settings({"thresholds": list(THRESHOLDS), **PRESETS[args.preset]}, args.set)
    too_many = [s for s in settings["step_counts"] if s > settings["new_tokens"]]
    if too_many:
        raise UsageError(f"step counts {too_many} exceed new_tokens {settings['new_tokens']}")
    if settings["prompt_tokens"] < 1 or settings["prompt_tokens"] + settings["new_tokens"] > settings["block_size"]:
        raise UsageError("prompt_tokens must be >= 1 and prompt_tokens + new_tokens <= block_size "
                         "(prompts and real continuations come from validation blocks)")
    warmup_block = settings["mask_warmup_block"]
    if settings["mask_warmup_steps"] and warmup_block and settings["block_size"] % warmup_block:
        raise UsageError(f"mask_warmup_block {warmup_block} must divide block_size {settings['block_size']} "
                         "(or --set mask_warmup_steps=0)")
    if settings["num_prompts"] < 2 or min(settings["max_steps"], settings["reference_max_steps"]) < 1:
        raise UsageError("num_prompts must be >= 2 (standard errors), max_steps and reference_max_steps >= 1")
    if settings["seeds"] < 1:
        raise UsageError("seeds must be >= 1")
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["card"]:  # python -m benchmarks.sampler_coherence card <json>: regenerate the card's section
        if len(argv) != 2:
            raise UsageError("usage: python -m benchmarks.sampler_coherence card <sampler_coherence.json>")
        print(update_card(argv[1]))
        return json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    if argv[:1] == ["merge"]:  # python -m benchmarks.sampler_coherence merge <output_dir> <json> <json> ...
        if len(argv) < 4:
            raise UsageError("usage: python -m benchmarks.sampler_coherence merge <output_dir> <json> <json> ...")
        report = merge(argv[1], argv[2:])
        print(f"merged seeds {[run['seed'] for run in report['runs']]} into {argv[1]}/sampler_coherence.json\n"
              f"verdict (over {report['se_over']}): {report['verdict']}\ncontrols: {report['control_verdict']}")
        return report
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    with torch_threads(settings["threads"]):
        return run(args, settings)


def run_seed(data: dict[str, Any], settings: dict[str, Any], device: torch.device, output_dir: Path,
             seed: int) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Train both models with `seed` and sample with it; the seed's record (training report, rows with their
    per-prompt values, real-text metrics and its own verdicts, paired over prompts) and its examples."""
    try:
        models = train_models(settings, data, device, output_dir / "checkpoints" / f"seed_{seed}", seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    rows, real, examples = run_sampling(models, data, settings, device, seed)
    lines, summary = verdict(rows, settings["step_counts"])
    control_lines, control_summary = control_verdict(rows, settings["step_counts"])
    real = {key: value for key, value in real.items() if key != "per_prompt"}  # its verdicts compare samplers only
    record = {"seed": seed, "training": models["report"], "real_text": real, "rows": rows, "comparisons": lines,
              "verdict": summary, "control_comparisons": control_lines, "control_verdict": control_summary}
    return record, examples


def summarise_runs(runs: Sequence[dict[str, Any]], step_counts: Sequence[int]) -> dict[str, Any]:
    """The report's table and verdicts from the seeds' records: over seeds (`over_seeds`, paired by seed) with two
    or more, else the one seed's own (over prompts)."""
    if len(runs) > 1:
        unit, rows = "seeds", over_seeds([run["rows"] for run in runs])
        real = over_seeds([[{**run["real_text"], "method": "real text"}] for run in runs])[0]
        lines, summary = verdict(rows, step_counts, unit)
        control_lines, control_summary = control_verdict(rows, step_counts, unit)
    else:
        unit, rows, real = "prompts", runs[0]["rows"], runs[0]["real_text"]
        lines, summary = runs[0]["comparisons"], runs[0]["verdict"]
        control_lines, control_summary = runs[0]["control_comparisons"], runs[0]["control_verdict"]
    return {"se_over": unit, "real_text": {key: value for key, value in real.items() if key not in UNITS.values()},
            "rows": [{key: value for key, value in row.items() if key != "per_prompt"} for row in rows],
            "comparisons": lines, "verdict": summary, "control_comparisons": control_lines,
            "control_verdict": control_summary}


def merge(output_dir: str | Path, paths: Sequence[str | Path]) -> dict[str, Any]:
    """One report from runs of the same preset and settings with different seeds (e.g. run side by side, one per
    core: `--seed 0 --set seeds=2` and `--seed 2 --set seeds=1`), as one run of all their seeds would have
    written it; `wall_seconds` is the longest part's, `merged_from` lists the parts.

    Raises:
        UsageError: fewer than two reports, different settings or data, or a seed in two of them.
    """
    reports = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    if len(reports) < 2:
        raise UsageError("merge takes two or more sampler_coherence.json reports")
    first = reports[0]

    def fixed(report: dict[str, Any]) -> tuple[Any, ...]:
        settings = {key: value for key, value in report["settings"].items() if key not in ("seed", "seeds")}
        return report["preset"], settings, report["data"]

    if any(fixed(report) != fixed(first) for report in reports[1:]):
        raise UsageError("the reports differ in preset, settings (other than the seeds) or data")
    runs = sorted((run for report in reports for run in report["runs"]), key=lambda run: run["seed"])
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"a seed appears in two reports: {seeds}")
    lowest = min(reports, key=lambda report: min(run["seed"] for run in report["runs"]))
    report = {
        "experiment": first["experiment"], "model_type": first["model_type"], "preset": first["preset"],
        "settings": {**first["settings"], "seed": seeds[0], "seeds": len(seeds)}, "data": first["data"],
        "environment": lowest["environment"], "wall_seconds": max(report["wall_seconds"] for report in reports),
        "merged_from": [{"seeds": [run["seed"] for run in report["runs"]], "wall_seconds": report["wall_seconds"],
                         "environment": report["environment"]} for report in reports],
        **summarise_runs(runs, first["settings"]["step_counts"]), "runs": runs, "examples": lowest["examples"],
    }
    output_dir = Path(output_dir)
    write_json(output_dir / "sampler_coherence.json", report)
    plot(report, output_dir / "sampler_coherence.png")
    return report


def run(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """The experiment with parsed arguments and settings (see the module docstring)."""
    device = resolve_device(args.device)
    output_dir = output_folder(args.output_dir, "sampler_coherence", args.preset)
    started = time.perf_counter()
    data = prepare_data(settings)
    runs, examples = [], []
    for number, seed in enumerate(range(args.seed, args.seed + settings["seeds"]), 1):
        print(f"[seed {number}/{settings['seeds']}] training and sampling with seed {seed}", flush=True)
        record, seed_examples = run_seed(data, settings, device, output_dir, seed)
        runs.append(record)
        examples = examples or seed_examples
    report = {
        "experiment": "sampler_coherence", "model_type": "masked_diffusion_lm", "preset": args.preset,
        "settings": {**settings, "train_file": data["train_file"], "seed": args.seed},
        "data": {"train_tokens": data["train"].num_tokens, "validation_tokens": data["validation"].num_tokens,
                 "eval_blocks": len(data["eval_blocks"]), "tokenizer": f"BPE {len(data['tokenizer'])}",
                 "tokens_per_byte": data["validation"].tokens_per_byte},
        "environment": environment(device, torch.float32), "wall_seconds": time.perf_counter() - started,
        **summarise_runs(runs, settings["step_counts"]), "runs": runs, "examples": examples,
    }
    write_json(output_dir / "sampler_coherence.json", report)
    plot(report, output_dir / "sampler_coherence.png")
    lines, control_lines = report["comparisons"], report["control_comparisons"]
    summary, control_summary, unit = report["verdict"], report["control_verdict"], report["se_over"]
    columns = [("method", "method"), ("steps", "steps"), ("threshold", "tau"), ("model_calls", "calls"),
               ("unseen_bigram_rate", "unseen bigrams"), ("unseen_bigram_rate_se", "± se"),
               ("reference_perplexity", "ref ppl"), ("reference_nll_se", "nll se"), ("entropy", "entropy"),
               ("repeat_rate", "repeats"), ("distinct_1", "dist-1"), ("distinct_2", "dist-2"), ("distinct_3", "dist-3"),
               ("remasked_per_sample", "remasked"), ("tokens_per_second", "tok/s")]
    print(format_table([*report["rows"], {**report["real_text"], "method": "real text", "steps": "—"}], columns))
    for run_record in runs:
        training = run_record["training"]
        print(f"seed {run_record['seed']}: diffusion validation NLL bound {training['diffusion_eval_nll_bound']:.4f} "
              f"nats/token ({training['diffusion_eval_bits_per_byte_bound']:.4f} bpb), reference Llama NLL "
              f"{training['reference_eval_nll']:.4f} ({training['reference_eval_bits_per_byte']:.4f} bpb)")
    print("\n".join([*lines, *control_lines]))
    print(f"\nverdict (over {unit}): {summary}\ncontrols: {control_summary}")
    print(f"wrote {output_dir}/sampler_coherence.json and sampler_coherence.png")
    return report


if __name__ == "__main__":
    run_cli(main)
