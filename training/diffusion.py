"""The staged training objective of the masked diffusion LM and its `Trainer`.

Per batch of token rows x (packed blocks; positions whose label is -100 are never masked nor scored):

1. **Main loss** (every step): draw one masking rate per row, t ~ U(eps, 1), stratified over the batch
   (t_i = eps + (1 - eps) * ((u + i / B) mod 1), one uniform u: MDLM's low-discrepancy sampler, which lowers the
   variance of the loss); replace each token by [MASK] with probability t_i; run the model on the noisy rows.
   * `loss_weighting=elbo` (default): sum over rows and masked positions of CE / t_i, divided by the number of
     scored positions. For the linear schedule (alpha_t = 1 - t) this is the continuous-time ELBO of MDLM, an
     upper bound on the negative log-likelihood in nats per token (LLaDA also divides by t).
   * `loss_weighting=mean`: the mean CE over masked positions, the original fork's choice (not a bound).
   Evaluation always reports the ELBO (with a fixed masking seed), whatever the training weighting, so that the
   CLI's `eval_loss` is a bound on the NLL (reported as perplexity / bits-per-byte *bounds*).
2. **Sampler loss** (models with a sampler head, from `config.start_sampler_step`): at every masked position,
   CE of the sampler head's logits given `[E(left) ; h.detach() ; E(right)]` with the neighbours of the *noisy*
   input (a masked neighbour is a zero vector, as at inference), target the true token; added without weight.
3. **Critic loss** (models with a critic head, from `config.start_critic_step`): sample a token at every masked
   position from the main logits (no gradient), run the trunk on the filled rows (no gradient), and train the
   critic head (on the detached hidden states) with BCE-with-logits to predict, at the filled positions, whether
   the sampled token differs from the truth; weighted by `config.critic_weight(step)` (a ramp to `critic_alpha`).

Neither auxiliary loss sends a gradient into the trunk or the LM head (their inputs are detached), so the trunk
trains exactly as without them. The steps are the Trainer's optimizer steps (`state.global_step`, from 0). Each
part is logged (`loss_main`, `loss_sampler`, `loss_critic` beside the total `loss`).

Objective arguments (`--objective_args`): `loss_weighting=elbo|mean`, `min_mask_rate=EPS` (default 1e-3), and an
optional BERT-style warm-up, off by default (the spec's objective from step 0):
`mask_warmup_steps=N` (default 0), `mask_warmup_rate=R` (default 0.15), `mask_warmup_block=L` (default 0: whole rows).
For the first N optimizer steps the main loss masks every row at the fixed rate R and takes the plain mean CE over
the masked tokens, on rows re-cut into sub-blocks of L tokens (each attends only within itself; the row length must
be a multiple of L); the sampler and critic losses of active stages see the same warm-up rows. A small masked LM sits
on a unigram plateau until attention learns to find a [MASK] position's neighbours, and a low fixed rate on short
blocks gets it there far sooner than the ELBO objective (measured: `benchmarks/diffusion_plateau.py`; the smoke
preset of `benchmarks/sampler_coherence.py` uses it). Evaluation is unaffected (always the ELBO on whole rows).

The stage schedule of the auxiliary heads (`start_sampler_step`, `start_critic_step`, `end_critic_step`,
`critic_alpha`) stays in `MaskedDiffusionConfig` rather than in `DiffusionObjective`: the config already decides
which heads exist (`add_sampler_head`, `add_critic_head`), and the steps at which they start training belong with
them in the saved checkpoint, so a run continued or resumed from a folder follows the same stages without the
command line repeating them, and the card's config shows the recipe. The options here change only the main loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from hf_models.configuration_zoo_common import check_interval, check_positive

from .options import ObjectiveOptions
from .trainer import CLIInputs, ZooTrainer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DiffusionObjective(ObjectiveOptions):
    """Options of the main diffusion loss (`--objective_args`).

    Attributes:
        loss_weighting: `"elbo"` (CE / t, the NLL bound) or `"mean"` (plain mean CE over masked tokens).
        min_mask_rate: eps, the smallest masking rate drawn (keeps 1/t finite).
        mask_warmup_steps: optimizer steps of the BERT-style warm-up before the diffusion loss (0: none).
        mask_warmup_rate: the fixed masking rate of the warm-up.
        mask_warmup_block: sub-block length the rows are re-cut into during the warm-up (0: whole rows).
    """

    objective_name: ClassVar[str] = "the masked diffusion objective"

    loss_weighting: Literal["elbo", "mean"] = "elbo"
    min_mask_rate: float = 1e-3
    mask_warmup_steps: int = 0
    mask_warmup_rate: float = 0.15
    mask_warmup_block: int = 0

    def validate(self) -> None:
        check_interval("min_mask_rate", self.min_mask_rate, 0.0, 1.0)
        if self.min_mask_rate == 0:
            raise ValueError("`min_mask_rate` must lie in (0, 1), got 0.")
        check_positive("mask_warmup_steps", self.mask_warmup_steps, allow_zero=True)
        check_positive("mask_warmup_block", self.mask_warmup_block, allow_zero=True)
        check_interval("mask_warmup_rate", self.mask_warmup_rate, 0.0, 1.0, closed_high=True)
        if self.mask_warmup_rate == 0:
            raise ValueError("`mask_warmup_rate` must lie in (0, 1], got 0.")

    def in_warmup(self, step: int) -> bool:
        """Whether optimizer step `step` (from 0) uses the fixed-rate warm-up loss."""
        return step < self.mask_warmup_steps

    def describe(self) -> str:
        """One line for the training log."""
        text = f"loss_weighting={self.loss_weighting}, min_mask_rate={self.min_mask_rate}"
        if self.mask_warmup_steps:
            block = self.mask_warmup_block or "whole rows"
            text += (f"; BERT-style warm-up for {self.mask_warmup_steps} steps: mask rate {self.mask_warmup_rate}, "
                     f"mean CE, blocks of {block}")
        return text


def sample_mask_rates(batch: int, min_rate: float, *, device: torch.device,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Stratified masking rates `(batch,)` in `[min_rate, 1)`: `min_rate + (1 - min_rate) * ((u + i / batch) mod 1)`."""
    offset = torch.rand(1, device=device, generator=generator)
    strata = (offset + torch.arange(batch, device=device) / batch) % 1.0
    return min_rate + (1.0 - min_rate) * strata


def mask_tokens(
    input_ids: torch.LongTensor, labels: torch.LongTensor, rates: torch.Tensor, mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Replace each scored token (label != -100) by the mask token with its row's probability.

    Returns:
        The noisy ids `(batch, seq)` and the masked positions `(batch, seq)`.
    """
    draws = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    masked = (draws < rates[:, None]) & (labels != IGNORE_INDEX)
    return input_ids.masked_fill(masked, mask_token_id), masked


def diffusion_loss(
    logits: torch.Tensor, labels: torch.LongTensor, masked: torch.BoolTensor, rates: torch.Tensor, weighting: str
) -> torch.Tensor:
    """The main loss (see the module docstring) from logits `(batch, seq, vocab)` of the noisy rows."""
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), labels.masked_fill(~masked, IGNORE_INDEX), ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    if weighting == "elbo":
        scored = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return (token_loss / rates[:, None]).sum() / scored
    return token_loss.sum() / masked.sum().clamp(min=1)


def sampler_loss(model: PreTrainedModel, noisy_ids: torch.LongTensor, hidden_states: torch.Tensor,
                 labels: torch.LongTensor, masked: torch.BoolTensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of the sampler head at the masked positions, its inputs built from the noisy rows (detached; padding
    neighbours count as missing)."""
    inputs = model.sampler_inputs(noisy_ids, hidden_states, attention_mask)[masked]
    logits = model.sampler_logits(inputs)
    return F.cross_entropy(logits, labels[masked], reduction="sum") / masked.sum().clamp(min=1)


def critic_targets(filled_ids: torch.LongTensor, labels: torch.LongTensor) -> torch.Tensor:
    """1.0 where the filled token differs from the true one, else 0.0 `(batch, seq)`."""
    return (filled_ids != labels).float()


def critic_loss(model: PreTrainedModel, noisy_ids: torch.LongTensor, logits: torch.Tensor, labels: torch.LongTensor,
                masked: torch.BoolTensor, generator: torch.Generator | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of the critic head at the masked positions after filling them with samples of the main model.

    The samples and the trunk pass on the filled rows (with the rows' `attention_mask`) carry no gradient; the
    critic reads detached hidden states.
    """
    with torch.no_grad():
        probabilities = logits.detach().float().softmax(dim=-1)
        probabilities[..., model.config.mask_token_id] = 0.0
        flat = probabilities.reshape(-1, probabilities.shape[-1])
        samples = torch.multinomial(flat, 1, generator=generator).view(labels.shape)
        filled = torch.where(masked, samples, noisy_ids)
        hidden_states = model.model(input_ids=filled, attention_mask=attention_mask).last_hidden_state
    critic = model.critic_logits(hidden_states)
    targets = critic_targets(filled, labels)
    loss = F.binary_cross_entropy_with_logits(critic[masked], targets[masked], reduction="sum")
    return loss / masked.sum().clamp(min=1)


def diffusion_losses(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    labels: torch.LongTensor | None,
    *,
    step: int,
    objective: DiffusionObjective,
    generator: torch.Generator | None = None,
    auxiliary: bool = True,
    forward: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """All active loss parts at optimizer step `step`.

    Args:
        model: the (unwrapped) `MaskedDiffusionForMaskedLM`.
        input_ids / labels: the clean rows `(batch, seq)`; `labels` default to `input_ids`.
        step: the optimizer step, which decides the active stages (and the warm-up, see `DiffusionObjective`).
        objective: the main loss options.
        generator: random generator for masking rates, masks and critic samples (default: torch's global one).
        auxiliary: add the sampler and critic losses of the active stages (off: the main loss only).
        forward: callable used for the main forward pass (e.g. the Trainer's wrapped model); default `model`.
        attention_mask: `(batch, seq)`, 0 at padding (padded rows: no attention to pads; pads carry label -100 and
            are never masked or scored); `None` for packed rows.

    Returns:
        The total loss, the parts by name (`main`, and `sampler` / `critic` when active) and the main outputs
        (during a warm-up with `mask_warmup_block`, of the re-cut rows).

    Raises:
        ValueError: `mask_warmup_block` does not divide the row length (during the warm-up).
    """
    config = model.config
    labels = input_ids if labels is None else labels
    weighting = objective.loss_weighting
    if objective.in_warmup(step):
        block = objective.mask_warmup_block
        if block:
            if input_ids.shape[1] % block:
                raise ValueError(f"mask_warmup_block={block} does not divide the row length {input_ids.shape[1]}")
            input_ids, labels = input_ids.reshape(-1, block), labels.reshape(-1, block)
            if attention_mask is not None:
                attention_mask = attention_mask.reshape(-1, block)
        rates = torch.full((input_ids.shape[0],), float(objective.mask_warmup_rate), device=input_ids.device)
        weighting = "mean"
    else:
        rates = sample_mask_rates(input_ids.shape[0], objective.min_mask_rate, device=input_ids.device,
                                  generator=generator)
    noisy, masked = mask_tokens(input_ids, labels, rates, config.mask_token_id, generator)
    outputs = (forward or model)(input_ids=noisy, attention_mask=attention_mask)
    parts = {"main": diffusion_loss(outputs.logits, labels, masked, rates, weighting)}
    total = parts["main"]
    if auxiliary and model.sampler_head is not None and step >= config.start_sampler_step:
        parts["sampler"] = sampler_loss(model, noisy, outputs.last_hidden_state, labels, masked, attention_mask)
        total = total + parts["sampler"]
    if auxiliary and model.critic_head is not None and step >= config.start_critic_step:
        parts["critic"] = critic_loss(model, noisy, outputs.logits, labels, masked, generator, attention_mask)
        total = total + config.critic_weight(step) * parts["critic"]
    return total, parts, outputs


class DiffusionTrainer(ZooTrainer):
    """`Trainer` of the masked diffusion LM: the staged objective of `diffusion_losses`, each part logged.

    In evaluation only the main loss is computed, always ELBO-weighted and with masks drawn from a generator
    re-seeded (`args.seed`) at every evaluation, so `eval_loss` is a reproducible NLL bound.
    """

    options_class = DiffusionObjective

    def __init__(self, *args: Any, objective: DiffusionObjective | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective or DiffusionObjective()
        self._eval_generator: torch.Generator | None = None
        logger.info("masked diffusion objective: %s", self.objective.describe())

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        if model.training:
            total, parts, outputs = diffusion_losses(
                unwrapped, inputs["input_ids"], inputs.get("labels"), step=self.state.global_step,
                objective=self.objective, forward=model, attention_mask=inputs.get("attention_mask"),
            )
            step = self.state.global_step
            if self.objective.mask_warmup_steps and step == self.objective.mask_warmup_steps:
                logger.info("masked diffusion objective: warm-up over at step %d, diffusion loss from now on", step)
            self.record_loss_components(**parts)
        else:
            if self._eval_generator is None:
                self._eval_generator = torch.Generator(device=inputs["input_ids"].device).manual_seed(self.args.seed)
            total, _, outputs = diffusion_losses(
                unwrapped, inputs["input_ids"], inputs.get("labels"), step=self.state.global_step,
                objective=DiffusionObjective("elbo", self.objective.min_mask_rate), generator=self._eval_generator,
                auxiliary=False, forward=model, attention_mask=inputs.get("attention_mask"),
            )
        outputs.loss = total
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.objective.mask_warmup_steps:
            # 1.0 while the logged steps were warm-up steps (a log at step s covers steps up to s - 1)
            logs["mask_warmup"] = float(self.objective.in_warmup(self.state.global_step - 1))
        super().log(logs, start_time)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_generator = None  # every evaluation draws the same masks
        return super().evaluate(*args, **kwargs)

    @classmethod
    def objective_kwargs(cls, options: DiffusionObjective, inputs: CLIInputs) -> dict[str, Any]:
        """`from_cli`'s hook: the objective (see `DiffusionObjective`), checked against the model and the blocks.

        Raises:
            ValueError: a model without a mask token, or a `mask_warmup_block` that does not divide the block size.
        """
        if getattr(inputs.model.config, "mask_token_id", None) is None:
            raise ValueError("the masked diffusion objective needs config.mask_token_id")
        if options.mask_warmup_steps and options.mask_warmup_block and len(inputs.train_dataset):
            row_length = len(inputs.train_dataset[0]["input_ids"])
            if row_length % options.mask_warmup_block:
                raise ValueError(f"mask_warmup_block={options.mask_warmup_block} must divide the block size "
                                 f"{row_length}")
        return {"objective": options}


ELBO_FORMS = ("count", "time")


@torch.no_grad()
def nelbo_samples(
    model: PreTrainedModel,
    rows: list[tuple[torch.LongTensor, torch.LongTensor]],
    *,
    num_samples: int,
    form: str = "count",
    min_mask_rate: float = 1e-3,
    batch_size: int = 32,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Monte Carlo samples of the negative ELBO of each continuation given its context, in nats: an upper bound on
    `-log p(continuation | context)` in expectation.

    Only the continuation (length L) is ever masked; the context stays visible. Two unbiased estimators of the same
    bound (each equals the any-order autoregressive bound `E_order sum_i -log p(x_order(i) | context, x_order(<i))`):

    * `count` (LLaDA's evaluation; lower variance): draw l ~ U{1..L}, mask exactly l positions chosen uniformly,
      score `(L / l) * sum of the masked tokens' cross-entropy`;
    * `time` (MDLM; the training objective `diffusion_losses` with `loss_weighting=elbo`): draw t ~ U(eps, 1), mask
      each position with probability t (`mask_tokens`), score `(1 / t) * sum of the masked tokens' cross-entropy`
      (eps = `min_mask_rate` truncates the integral, a bias of order eps).

    The count form is the time form with t = l / L and exactly l masks: with t ~ U(0, 1), l is uniform on {0..L}
    and E[1/t | l] = (L + 1) / l. Draws are independent (no stratification), so the standard error of the mean of
    the samples is `std / sqrt(num_samples)`. Rows of one forward batch are right-padded (padding keys are masked).

    Args:
        model: a `MaskedDiffusionForMaskedLM` (with `config.mask_token_id`), in eval mode.
        rows: `(context_ids (c,), continuation_ids (L,))` pairs with L >= 1.
        num_samples: Monte Carlo samples per row.
        form: `"count"` or `"time"`.
        min_mask_rate: eps of the time form.
        batch_size: sequences per forward pass.
        generators: one generator per row (default: torch's global one); a row's samples depend only on its own.

    Returns:
        `(len(rows), num_samples)` float64 nats.

    Raises:
        ValueError: an unknown form, an empty continuation, or fewer than one sample.
    """
    if form not in ELBO_FORMS:
        raise ValueError(f"form must be one of {ELBO_FORMS}, got {form!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    mask_id = model.config.mask_token_id
    noisy, labels, masks, rates = [], [], [], []
    for index, (context, continuation) in enumerate(rows):
        context, continuation = context.cpu(), continuation.cpu()
        length = continuation.numel()
        if length < 1:
            raise ValueError("every continuation needs at least one token")
        generator = generators[index] if generators is not None else None
        ids = torch.cat((context, continuation)).expand(num_samples, -1)
        row_labels = torch.cat((torch.full_like(context, IGNORE_INDEX), continuation)).expand_as(ids)
        if form == "count":
            counts = torch.randint(1, length + 1, (num_samples,), generator=generator)
            ranks = torch.rand(num_samples, length, generator=generator).argsort(dim=1).argsort(dim=1)
            masked = torch.cat((torch.zeros(num_samples, context.numel(), dtype=torch.bool), ranks < counts[:, None]),
                               dim=1)
            row_noisy, row_rates = ids.masked_fill(masked, mask_id), counts.double() / length
        else:
            row_rates = min_mask_rate + (1 - min_mask_rate) * torch.rand(num_samples, generator=generator,
                                                                         dtype=torch.float64)
            row_noisy, masked = mask_tokens(ids, row_labels, row_rates, mask_id, generator)
        noisy.extend(row_noisy)
        labels.extend(row_labels)
        masks.extend(masked)
        rates.append(row_rates)
    rates = torch.cat(rates)
    nats = torch.empty(len(noisy), dtype=torch.float64)
    by_length = sorted(range(len(noisy)), key=lambda i: noisy[i].numel())
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start:start + batch_size]
        width = max(noisy[i].numel() for i in chunk)
        input_ids = torch.full((len(chunk), width), mask_id, dtype=torch.long)
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            size = noisy[i].numel()
            input_ids[row, :size] = noisy[i]
            targets[row, :size] = labels[i].masked_fill(~masks[i], IGNORE_INDEX)
            attention_mask[row, :size] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        token_nats = F.cross_entropy(logits.float().transpose(1, 2), targets.to(logits.device),
                                     ignore_index=IGNORE_INDEX, reduction="none")
        nats[chunk] = token_nats.double().sum(dim=1).cpu() / rates[chunk]
    return nats.view(len(rows), num_samples)


__all__ = ["DiffusionObjective", "DiffusionTrainer", "ELBO_FORMS", "critic_loss", "critic_targets", "diffusion_loss",
           "diffusion_losses", "mask_tokens", "nelbo_samples", "sample_mask_rates", "sampler_loss"]
