"""The sampler-coherence experiment of the masked diffusion LM: does wavefront sampling with the sampler head (and
critic-guided remasking) make parallel un-masking locally more coherent, and at what speed?

    python -m benchmarks.sampler_coherence --preset smoke     # minutes on 2 CPU cores, tinystories sample
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
   (temperature and top-p fixed, one sampling seed), and measure on the generated tokens:
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
4. Verdict: at each step count, wavefront vs naive and critic vs no critic, in unseen-bigram rate and reference
   NLL, against twice the standard error of the difference (over prompts); the controls: left-to-right vs naive
   and wavefront vs left-to-right at each step count, and each threshold against naive and left-to-right at the
   smallest step count with at least its mean number of calls (so the control is never given fewer calls), in
   reference NLL, unseen bigrams and entropy.

Any setting of the preset changes with `--set`, e.g. `--set max_steps=200,step_counts=[8,16]`. Writes
`sampler_coherence.json` and `sampler_coherence.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import math
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

from .harness import add_deprecated_settings, add_preset_argument, add_set_argument, apply_settings, environment, \
    figure_title, format_table, mean_and_se, output_folder, positive_floats, positive_ints, prepare_corpus, pyplot, resolve_device, save_figure, \
    torch_threads, training_arguments, write_json

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
    "smoke": dict(train_file="tinystories_valid_sample.txt", vocab_size=1024, block_size=128, hidden_size=128,
                  num_hidden_layers=4, num_attention_heads=4, batch_size=16, max_steps=1200, reference_max_steps=400,
                  learning_rate=2e-3, start_sampler_step=300, start_critic_step=600, end_critic_step=900,
                  mask_warmup_steps=300, mask_warmup_rate=0.15, mask_warmup_block=32, max_train_documents=None,
                  max_eval_blocks=64, num_prompts=32, prompt_tokens=16, new_tokens=64, step_counts=[8, 16, 32, 64],
                  temperature=1.0, top_p=0.9, threads=1),
    # The original's stage schedule (main only to 1,000; + sampler; + critic from 3,000, full weight at 5,000), a
    # 256-wide 6-layer model, 128 new tokens, 128 prompts. Meant for a GPU.
    "original": dict(train_file="tinystories_valid_sample.txt", vocab_size=4096, block_size=256, hidden_size=256,
                 num_hidden_layers=6, num_attention_heads=8, batch_size=32, max_steps=6000, reference_max_steps=6000,
                 learning_rate=1e-3,
                 start_sampler_step=1000, start_critic_step=3000, end_critic_step=5000, mask_warmup_steps=0,
                 mask_warmup_rate=0.15, mask_warmup_block=0, max_train_documents=None,
                 max_eval_blocks=256, num_prompts=128, prompt_tokens=32, new_tokens=128,
                 step_counts=[8, 16, 32, 64, 128], temperature=1.0, top_p=0.9, threads=None),
}
# One point at ~25M parameters on an H200 in about a minute (benchmarks.gpu_campaign; sized by estimate, not yet
# measured on a GPU): 512 wide, 8 layers, 600 steps of 64 x 256 tokens with the smoke preset's mask warm-up and the
# original's stage order compressed, 64 prompts.
PRESETS["gpu"] = {**PRESETS["original"], "hidden_size": 512, "num_hidden_layers": 8, "batch_size": 64,
                  "max_steps": 600, "reference_max_steps": 300, "start_sampler_step": 150,
                  "start_critic_step": 300, "end_critic_step": 450, "mask_warmup_steps": 150,
                  "mask_warmup_block": 32, "num_prompts": 64, "step_counts": [16, 32, 64, 128]}
INT_SETTINGS = ("threads", "vocab_size", "block_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
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


def compare(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, float]:
    """Mean paired difference a - b over prompts of `key` and its standard error."""
    diffs = [x - y for x, y in zip(a["per_prompt"][key], b["per_prompt"][key])]
    return mean_and_se(diffs)


def verdict(rows: list[dict[str, Any]], step_counts: Sequence[int]) -> tuple[list[str], str]:
    """Paired comparisons (difference beyond 2 standard errors = significant) and a one-line verdict.

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
                diff, se = compare(by_key[(treated, steps)], by_key[(control, steps)], key)
                significant = abs(diff) > 2 * se
                parts.append(f"{label} {diff:+.4f} ± {se:.4f}" + (" *" if significant else ""))
                if significant:
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
               "(significant = beyond 2 standard errors of the paired difference over prompts)")
    return lines, summary


CONTROL_MEASURES = (("reference_nll", "ref NLL"), ("unseen_bigram_rate", "unseen bigrams"), ("entropy", "entropy"))


def matched_steps(calls: float, step_counts: Sequence[int]) -> int:
    """The smallest step count with at least `calls` model calls (the largest if none has)."""
    return min((s for s in step_counts if s >= calls), default=max(step_counts))


def control_verdict(rows: list[dict[str, Any]], step_counts: Sequence[int]) -> tuple[list[str], str]:
    """The controls, paired over prompts in reference NLL, unseen bigrams and entropy (significant = beyond 2
    standard errors): left-to-right vs naive and wavefront vs left-to-right at each step count, and each threshold
    vs naive and vs left-to-right at `matched_steps` of its mean number of calls."""
    by_key = {(row["method"], row["steps"]): row for row in rows if row["method"] != "threshold"}
    pairs: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    for steps in step_counts:
        for treated, control in (("left_to_right", "naive"), ("wavefront", "left_to_right")):
            if (treated, steps) in by_key and (control, steps) in by_key:
                pairs.append((f"{steps} steps, {treated} vs {control}", f"{treated} vs {control}",
                              by_key[(treated, steps)], by_key[(control, steps)]))
    for row in (row for row in rows if row["method"] == "threshold"):
        steps = matched_steps(row["model_calls"], step_counts)
        for control in ("naive", "left_to_right"):
            if (control, steps) in by_key:
                pairs.append((f"threshold {row['threshold']} ({row['model_calls']:.1f} calls) vs {control} at "
                              f"{steps} steps", f"threshold vs {control}", row, by_key[(control, steps)]))
    lines, tally = [], {}
    for label, group, treated, control in pairs:
        parts = []
        counts = tally.setdefault(group, {key: [0, 0, 0] for key, _ in CONTROL_MEASURES})
        for key, name in CONTROL_MEASURES:
            diff, se = compare(treated, control, key)
            significant = abs(diff) > 2 * se
            parts.append(f"{name} {diff:+.4f} ± {se:.4f}" + (" *" if significant else ""))
            counts[key][0] += 1
            if significant:
                counts[key][1 if diff < 0 else 2] += 1
        lines.append(f"{label}: " + ", ".join(parts))
    summary = "; ".join(
        f"{group} ({counts['reference_nll'][0]} comparisons): " + ", ".join(
            f"{name} lower in {counts[key][1]}, higher in {counts[key][2]}" for key, name in CONTROL_MEASURES)
        for group, counts in tally.items()) + " (significant = beyond 2 standard errors of the paired difference)"
    return lines, summary


CARD_COLUMNS = [("method", "sampler"), ("steps", "steps"), ("threshold", "τ"), ("model_calls", "calls / sample"),
                ("reference_perplexity", "ref. perplexity"), ("reference_nll_se", "NLL se"), ("entropy", "entropy"),
                ("entropy_se", "entropy se"), ("unseen_bigram_rate", "unseen bigrams"), ("distinct_1", "distinct-1"),
                ("distinct_2", "distinct-2"), ("distinct_3", "distinct-3"), ("tokens_per_second", "tokens/s")]


def card_table(report: dict[str, Any]) -> str:
    """The Markdown table of the model card (naive, left-to-right, wavefront and threshold rows, then real text),
    generated from a `sampler_coherence.json` report."""
    order = {"naive": 0, "left_to_right": 1, "wavefront": 2, "threshold": 3}
    rows = sorted((row for row in report["rows"] if row["method"] in order),
                  key=lambda row: (order[row["method"]], row["steps"] or 0, -(row["threshold"] or 0)))
    real = {**report["real_text"], "method": "real continuation"}
    return format_table([*rows, real], CARD_COLUMNS, markdown=True)


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
    parameters = report["training"]["diffusion_parameters"]
    fig.suptitle(figure_title(f"Masked diffusion sampler coherence: {parameters:,} parameters (Llama "
                              f"{settings['reference_max_steps']} steps), T={settings['temperature']}, "
                              f"top-p={settings['top_p']}, {settings['num_prompts']} prompts", report["preset"],
                              settings["max_steps"], report["environment"]), fontsize=9)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(parser, PRESETS)
    add_set_argument(parser, "preset fields (thresholds=[] drops the threshold arm; train_file: a corpus path or a "
                             "file in $HF_ZOO_DATA)")
    add_deprecated_settings(parser, {**dict.fromkeys(INT_SETTINGS, int), **dict.fromkeys(FLOAT_SETTINGS, float),
                                     "step_counts": positive_ints, "thresholds": positive_floats, "train_file": str})
    parser.add_argument("--seed", type=int, default=0)
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
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    with torch_threads(settings["threads"]):
        return run(args, settings)


def run(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """The experiment with parsed arguments and settings (see the module docstring)."""
    device = resolve_device(args.device)
    output_dir = output_folder(args.output_dir, "sampler_coherence", args.preset)
    data = prepare_data(settings)
    try:
        models = train_models(settings, data, device, output_dir / "checkpoints", args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    rows, real, examples = run_sampling(models, data, settings, device, args.seed)
    lines, summary = verdict(rows, settings["step_counts"])
    control_lines, control_summary = control_verdict(rows, settings["step_counts"])
    report = {
        "experiment": "sampler_coherence", "preset": args.preset,
        "settings": {**settings, "train_file": data["train_file"], "seed": args.seed},
        "data": {"train_tokens": data["train"].num_tokens, "validation_tokens": data["validation"].num_tokens,
                 "eval_blocks": len(data["eval_blocks"]), "tokenizer": f"BPE {len(data['tokenizer'])}",
                 "tokens_per_byte": data["validation"].tokens_per_byte},
        "training": models["report"],
        "environment": environment(device, torch.float32),
        "real_text": {key: value for key, value in real.items() if key != "per_prompt"},
        "rows": rows, "comparisons": lines, "verdict": summary, "control_comparisons": control_lines,
        "control_verdict": control_summary, "examples": examples,
    }
    write_json(output_dir / "sampler_coherence.json", report)
    plot(report, output_dir / "sampler_coherence.png")
    columns = [("method", "method"), ("steps", "steps"), ("threshold", "tau"), ("model_calls", "calls"),
               ("unseen_bigram_rate", "unseen bigrams"), ("unseen_bigram_rate_se", "± se"),
               ("reference_perplexity", "ref ppl"), ("reference_nll_se", "nll se"), ("entropy", "entropy"),
               ("repeat_rate", "repeats"), ("distinct_1", "dist-1"), ("distinct_2", "dist-2"), ("distinct_3", "dist-3"),
               ("remasked_per_sample", "remasked"), ("tokens_per_second", "tok/s")]
    print(format_table([*rows, {**real, "method": "real text", "steps": "—"}], columns))
    training = models["report"]
    print(f"\ndiffusion validation NLL bound {training['diffusion_eval_nll_bound']:.4f} nats/token "
          f"({training['diffusion_eval_bits_per_byte_bound']:.4f} bpb), reference Llama NLL "
          f"{training['reference_eval_nll']:.4f} ({training['reference_eval_bits_per_byte']:.4f} bpb)")
    print("\n".join([*lines, *control_lines]))
    print(f"\nverdict: {summary}\ncontrols: {control_summary}")
    print(f"wrote {output_dir}/sampler_coherence.json and sampler_coherence.png")
    return report


if __name__ == "__main__":
    run_cli(main)
