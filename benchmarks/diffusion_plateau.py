"""Diagnostic of the masked diffusion LM's unigram plateau: does a training recipe let the trunk leave it?

A plain AdamW loop (linear warm-up of the learning rate, then cosine; gradient clipping 1.0; one torch thread by
default) on the smoke data of `benchmarks.sampler_coherence` (`tinystories_valid_sample.txt` from `$HF_ZOO_DATA`,
BPE 1,024, blocks of 128) with the smoke preset's 1.38M-parameter model (heads off). Every `--eval_every` steps it
reports, on the first `--eval_blocks` validation blocks (always whole 128-token blocks):

* the loss at fixed mask rates 0.15 / 0.5 / 0.9 (mean CE over the masked positions, masks from a fixed seed): a
  trunk that ignores its context scores the unigram entropy at every rate;
* the ELBO bound (the `DiffusionTrainer`'s evaluation loss: 1/t-weighted CE, t ~ U(eps, 1), fixed masking seed);

against the corpus's unigram entropy. Modes (`--mode`):

    fixed     BERT-style: every row masked at `--rate`, mean CE
    elbo      the spec's objective (`training.diffusion.diffusion_losses`), optionally after the warm-up
              `--mask_warmup_steps/--mask_warmup_rate/--mask_warmup_block` (the smoke preset's recipe) and with the
              upper mask rate ramped from `--tmax0` to 1 over `--ramp` steps
    mean      the same masking with the fork's plain mean CE
    onebatch  fixed-rate masking on one fixed batch (masks redrawn each step): can the model fit it?
    ar        the same trunk with causal attention and next-token CE (the reference: how fast the trunk learns)

    taskset -c 1 python -m benchmarks.diffusion_plateau --mode fixed --rate 0.15 --steps 300 --block 32
    taskset -c 1 python -m benchmarks.diffusion_plateau --mode elbo --steps 600
    taskset -c 1 python -m benchmarks.diffusion_plateau --mode elbo --steps 1200 --mask_warmup_steps 300 \\
        --mask_warmup_block 32                                                         # the smoke preset's recipe
    taskset -c 1 python -m benchmarks.diffusion_plateau --mode ar --steps 200

`--block` re-cuts the training blocks (e.g. 32: batch x 128 / 32 rows of 32 tokens; the batch is in 128-token
blocks). Writes `diffusion_plateau.json` (settings, unigram entropies, the curve) and `diffusion_plateau.png` (the
fixed-rate losses and the bound against the step) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import hf_models  # noqa: F401  (fills the registry)
from hf_models.masked_diffusion import MaskedDiffusionForMaskedLM
from hf_models.registry import get_spec
from training.common import UsageError, run_cli
from training.diffusion import DiffusionObjective, diffusion_loss, diffusion_losses, mask_tokens, sample_mask_rates
from training.train import config_for_tokenizer

from .harness import add_deprecated_settings, add_set_argument, apply_settings, environment, figure_title, \
    outside_legend, output_folder, pyplot, save_figure, torch_threads, write_json
from .sampler_coherence import PRESETS, prepare_data

MODES = ("fixed", "elbo", "mean", "onebatch", "ar")
EVAL_RATES = (0.15, 0.5, 0.9)


def unigram_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """The training tokens' unigram entropy and the validation tokens' cross-entropy under the training unigram
    (add-one smoothing), in nats per token."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).float()
    probabilities = counts / counts.sum()
    present = probabilities[probabilities > 0]
    smoothed = (counts + 1) / (counts.sum() + vocab_size)
    return -(present * present.log()).sum().item(), -smoothed[eval_ids.flatten()].log().mean().item()


def make_model(tokenizer: Any, *, seed: int = 0, **overrides: Any) -> MaskedDiffusionForMaskedLM:
    """The smoke preset's model (128 wide, 4 layers, 4 heads, context 128) with config `overrides`."""
    smoke = PRESETS["smoke"]
    values = {"hidden_size": smoke["hidden_size"], "num_hidden_layers": smoke["num_hidden_layers"],
              "num_attention_heads": smoke["num_attention_heads"], "max_position_embeddings": smoke["block_size"],
              **overrides}
    config = config_for_tokenizer(get_spec("masked_diffusion_lm"), tokenizer, values)
    torch.manual_seed(seed)
    return MaskedDiffusionForMaskedLM(config)


@torch.no_grad()
def fixed_rate_loss(model: MaskedDiffusionForMaskedLM, blocks: torch.Tensor, rate: float, *, seed: int = 123,
                    batch_size: int = 16) -> float:
    """Mean CE over the masked positions of `blocks` masked at `rate` (masks from generator seed `seed`)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        rows = blocks[start:start + batch_size]
        noisy, masked = mask_tokens(rows, rows, torch.full((rows.shape[0],), rate), model.config.mask_token_id,
                                    generator)
        logits = model(input_ids=noisy).logits
        total += F.cross_entropy(logits[masked].float(), rows[masked], reduction="sum").item()
        count += int(masked.sum())
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def elbo_bound(model: MaskedDiffusionForMaskedLM, blocks: torch.Tensor, *, seed: int = 0, batch_size: int = 16,
               min_mask_rate: float = 1e-3) -> float:
    """The ELBO bound (nats/token) of `blocks`, averaged over batches, masks from generator seed `seed`."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, blocks.shape[0], batch_size):
        rows = blocks[start:start + batch_size]
        loss, _, _ = diffusion_losses(model, rows, rows, step=0, objective=DiffusionObjective("elbo", min_mask_rate),
                                      generator=generator, auxiliary=False)
        values.append(loss.item())
    model.train(was_training)
    return sum(values) / len(values)


def training_loss(model: MaskedDiffusionForMaskedLM, rows: torch.Tensor, step: int, args: argparse.Namespace,
                  objective: DiffusionObjective, generator: torch.Generator) -> torch.Tensor:
    """The loss of one training step of `--mode` (see the module docstring)."""
    if args.mode == "ar":
        logits = model(input_ids=rows).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), rows[:, 1:])
    if args.mode in ("fixed", "onebatch"):
        rates = torch.full((rows.shape[0],), args.rate)
        weighting = "mean"
    elif objective.in_warmup(step) or step >= args.ramp:
        loss, _, _ = diffusion_losses(model, rows, rows, step=step, objective=objective, generator=generator,
                                      auxiliary=False)
        return loss
    else:  # the upper mask rate ramped from tmax0 to 1
        rates = sample_mask_rates(rows.shape[0], args.eps, device=rows.device, generator=generator)
        upper = args.tmax0 + (1 - args.tmax0) * step / args.ramp
        rates = args.eps + (rates - args.eps) * (upper - args.eps) / (1 - args.eps)
        weighting = args.mode
    noisy, masked = mask_tokens(rows, rows, rates, model.config.mask_token_id, generator)
    return diffusion_loss(model(input_ids=noisy).logits, rows, masked, rates, weighting)


def plot(report: dict[str, Any], path: Path) -> None:
    """The fixed-rate losses and the ELBO bound against the step, with the unigram entropy."""
    plt = pyplot()
    curve = report["curve"]
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [point["step"] for point in curve]
    for index, rate in enumerate(EVAL_RATES):
        ax.plot(steps, [point["fixed_rate_loss"][str(rate)] for point in curve], "o-", color=f"C{index}",
                label=f"mask rate {rate}: mean CE")
    if report["settings"]["mode"] != "ar":
        ax.plot(steps, [point["elbo_bound"] for point in curve], "s--", color="C3", label="ELBO bound")
    ax.axhline(report["unigram_entropy_validation"], color="0.3", linestyle=":", label="unigram cross-entropy")
    warmup = report["settings"]["mask_warmup_steps"]
    if warmup and report["settings"]["mode"] == "elbo":
        ax.axvline(warmup, color="0.6", linestyle="--", label="end of the fixed-rate warm-up")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss, nats/token")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    settings = report["settings"]
    ax.set_title(figure_title(f"diffusion_plateau: mode {settings['mode']}, lr {settings['lr']}, batch "
                              f"{settings['batch']} x 128 (rows of {settings['block']})", "smoke", settings["steps"],
                              report["environment"]), fontsize=9)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="fixed", help="Training objective (see above).")
    parser.add_argument("--rate", type=float, default=0.15, help="Mask rate of --mode fixed / onebatch.")
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    parser.add_argument("--batch", type=int, default=16, help="Batch size in 128-token blocks.")
    parser.add_argument("--block", type=int, default=128, help="Re-cut training rows to this length (divides 128).")
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate.")
    parser.add_argument("--warmup", type=int, default=30, help="Linear learning-rate warm-up steps (then cosine).")
    parser.add_argument("--std", type=float, default=0.02, help="Initializer range (std of the weights).")
    parser.add_argument("--untied", action="store_true", help="Untie the LM head from the embedding.")
    parser.add_argument("--layers", type=int, default=None, help="Layers (default: the smoke preset's 4).")
    parser.add_argument("--eps", type=float, default=1e-3, help="Smallest mask rate of the ELBO objective.")
    parser.add_argument("--tmax0", type=float, default=1.0, help="Upper mask rate at step 0 (--mode elbo/mean).")
    parser.add_argument("--ramp", type=int, default=0, help="Steps over which the upper mask rate reaches 1.")
    parser.add_argument("--mask_warmup_steps", type=int, default=0,
                        help="--mode elbo/mean: fixed-rate warm-up steps first (DiffusionObjective's option).")
    parser.add_argument("--mask_warmup_rate", type=float, default=0.15, help="Mask rate of the warm-up.")
    parser.add_argument("--mask_warmup_block", type=int, default=0, help="Sub-block length of the warm-up (0: rows).")
    parser.add_argument("--eval_every", type=int, default=100, help="Evaluate every this many steps.")
    parser.add_argument("--eval_blocks", type=int, default=50, help="Validation blocks evaluated.")
    add_set_argument(parser, "fields of sampler_coherence's smoke preset (the data: train_file, max_train_documents, "
                             "vocab_size)")
    add_deprecated_settings(parser, {"train_file": str, "max_train_documents": int, "vocab_size": int})
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation and the batches.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is).")
    parser.add_argument("--output_dir", default=None, help="Default: results/diffusion_plateau-<mode>-<timestamp>.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.eval_every < 1 or args.eval_blocks < 1 or args.warmup < 1:
        raise UsageError("--steps, --batch, --eval_every, --eval_blocks and --warmup must be >= 1")
    if args.block < 1 or PRESETS["smoke"]["block_size"] % args.block:
        raise UsageError(f"--block {args.block} must divide the block size {PRESETS['smoke']['block_size']}")
    if args.mode == "ar" and (args.mask_warmup_steps or args.ramp):
        raise UsageError("--mode ar takes no mask warm-up or ramp")
    try:
        objective = DiffusionObjective(args.mode if args.mode in ("elbo", "mean") else "elbo", args.eps,
                                       args.mask_warmup_steps, args.mask_warmup_rate, args.mask_warmup_block)
    except ValueError as error:
        raise UsageError(str(error)) from None
    settings = apply_settings(PRESETS["smoke"], args.set)
    with torch_threads(args.threads):
        return run(args, objective, settings)


def run(args: argparse.Namespace, objective: DiffusionObjective, settings: dict[str, Any]) -> dict[str, Any]:
    """The diagnostic with parsed arguments and the data settings (see the module docstring)."""
    output_dir = output_folder(args.output_dir, "diffusion_plateau", args.mode)
    data = prepare_data(settings)
    tokenizer = data["tokenizer"]
    train = torch.tensor(data["train"].blocks["input_ids"])
    blocks = torch.tensor(data["eval_blocks"]["input_ids"])[:args.eval_blocks]
    entropy_train, entropy_validation = unigram_entropy(train, blocks, len(tokenizer))
    print(f"unigram entropy: train {entropy_train:.3f}, validation cross-entropy {entropy_validation:.3f} nats",
          flush=True)

    overrides: dict[str, Any] = {"initializer_range": args.std, "add_sampler_head": False, "add_critic_head": False}
    if args.untied:
        overrides["tie_word_embeddings"] = False
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.mode == "ar":
        overrides["attention_type"] = "causal"
    model = make_model(tokenizer, seed=args.seed, **overrides).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)

    def evaluate(step: int, train_loss: float | None, seconds: float) -> dict[str, Any]:
        point = {"step": step, "train_loss": train_loss, "seconds": round(seconds, 1),
                 "fixed_rate_loss": {str(rate): fixed_rate_loss(model, blocks, rate) for rate in EVAL_RATES},
                 "elbo_bound": None if args.mode == "ar" else elbo_bound(model, blocks, min_mask_rate=args.eps)}
        fixed = ", ".join(f"{rate} {value:.3f}" for rate, value in point["fixed_rate_loss"].items())
        bound = "" if point["elbo_bound"] is None else f", ELBO bound {point['elbo_bound']:.3f}"
        train_text = "" if train_loss is None else f"train {train_loss:.3f}, "
        print(f"step {step:5d}: {train_text}fixed-rate CE {fixed}{bound} ({seconds:.0f} s)", flush=True)
        return point

    curve = [evaluate(0, None, 0.0)]
    fixed_batch = train[:args.batch].reshape(-1, args.block)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        if args.mode == "onebatch":
            rows = fixed_batch
        else:
            rows = train[torch.randint(0, train.shape[0], (args.batch,), generator=generator)].reshape(-1, args.block)
        loss = training_loss(model, rows, step, args, objective, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append(evaluate(step + 1, sum(losses) / len(losses), time.perf_counter() - start))
            losses = []
    seconds = time.perf_counter() - start

    report = {
        "experiment": "diffusion_plateau",
        "settings": {**{key: value for key, value in vars(args).items() if key != "set"},
                     "max_train_documents": settings["max_train_documents"], "vocab_size": settings["vocab_size"],
                     "output_dir": str(output_dir), "train_file": data["train_file"],
                     "objective": objective.describe() if args.mode in ("elbo", "mean") else None},
        "parameters": sum(p.numel() for p in model.parameters()),
        "unigram_entropy_train": entropy_train, "unigram_entropy_validation": entropy_validation,
        "eval_blocks": int(blocks.shape[0]), "train_seconds": seconds, "curve": curve,
        "environment": environment(torch.device("cpu"), torch.float32),
    }
    write_json(output_dir / "diffusion_plateau.json", report)
    plot(report, output_dir / "diffusion_plateau.png")
    print(f"{args.steps} steps in {seconds:.0f} s; wrote {output_dir}/diffusion_plateau.json and "
          "diffusion_plateau.png", flush=True)
    return report


if __name__ == "__main__":
    run_cli(main)
