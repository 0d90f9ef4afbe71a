"""Layer-wise distillation of NPT layers from their own base Llama (seed 004): teacher capture, the losses (the
original repository's, the seed's seven proposals as written, and the sound versions), stage schedules, adaptive
loss weighting, evaluation, and the `NPTTrainer` that `python -m training.train --model_type npt_llama` runs.

The teacher is the same model under `model.npt_disabled()`, captured with hooks on the real forward pass (true
rotary positions, causal and padding masks): per NPT layer `h_in`, the attention output `a`, the MLP input
`LN2(h + a)`, the MLP output and `h_out`, plus the final logits. The student is the same call with NPT enabled and
`output_npt=True`. Only the NP components train.

Losses (M = valid-token mask; every sound loss is masked, so padding never changes a value):
* direct        `nmse`: sum M‖y - τ‖² / sum M‖τ‖², τ = a + MLP(LN2(h+a)) (replace) or MLP(LN2(h+a)) (keep);
                `repo`: MSE(y, τ) / (RMS(τ) + 1e-6).
* attention     the repository's attention encoding: MSE(v_a, a)/(RMS(a)+1e-6) + 0.5 (1 - mean cos(v_a, a)).
* fidelity      `kl`: KL(p_teacher ‖ p_npt) per token (nats); `mse`: the repository's MSE on logits.
* regularization `element`: mean(v_a²) + mean(v_b²); `token`: mean ‖v_a‖² + ‖v_b‖²; `delta_norm`: mean
                sum_j ‖v_a_j‖‖v_b_j‖ (= ‖ΔW‖_F for k = 1); `modulation`: mean ‖m‖² (all from Gram matrices).
* mg            modulation guidance. `exact`: sum M‖m_P - Δ*_P‖² / sum M‖Δ*_P‖² with Δ*_gate = W_g(LN2(h+a) - x),
                Δ*_up likewise, Δ*_down = MLP(LN2(h+a)) - W_d i (the exact pre-activation change), plus the bounded
                anti-collapse hinge relu(mg_min_std - std_M(s)). `seed`: MSE(σ(s), σ(‖a‖/‖h‖)) - 0.1 Var(s).
* decomposed    `delta`: NMSE(y - MLP(x), τ - MLP(x)) (supervise what the modulation must add). `seed`: the seed's
                slice `y[..., :d]`, which is all of y, so its "MLP part" is identically zero.
* ib            `rate`: ½ mean ‖z‖² (the rate term of a fixed-variance Gaussian code, KL(N(z, I) ‖ N(0, I)),
                non-negative). `seed`: β|cos(v_a, h)| - |cos(v_a, a)| (negative, not a mutual information).
* projection    `direction`: 1 - mean cos(m_gate, Δ*_gate) (sign-aware, through the RMSNorm). `seed`: the seed's
                consistency + alignment with W_g a.
* orthogonality `pca`: mean ‖normalize(v_a) V_q‖² with V_q the top principal directions of the centred MLP input,
                detached and refreshed every `orth_refresh` steps. `seed`: `v_a @ V.T` (a shape error unless d = q).
Curriculum (`valid` / `seed`) masks tokens whose ‖a‖ is above the 30 % / 70 % quantile for the first steps; it
applies to token-local losses only (not to fidelity). Schedules: `none` (static `weight_*`), `repo` (the
repository's three stages, with its jump at 3S) and `smooth` (stage 2 ramps to the stage-3 weights). Adaptive
weighting: `invgrad` (inverse gradient-norm balancing on the NP parameters), `gradnorm` (Chen et al. 2018),
`uncertainty` (Kendall et al. 2018) and `seed` (the seed's version, whose weights are always uniform).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments, default_data_collator

from hf_models.npt import NPTForCausalLM
from hf_models.npt.modeling_npt import NPTLayerRecord

from .trainer import ZooTrainer

LOSS_NAMES = ("direct", "attention", "fidelity", "regularization", "mg", "decomposed", "ib", "projection",
              "orthogonality")
# Losses that can be negative (the seed's versions) or that must not be balanced (the regulariser) keep their weight.
_NEVER_BALANCED = ("regularization",)
LOSS_WEIGHTING_FILE = "npt_loss_weighting.json"  # beside a checkpoint's weights: the adaptive weights' state


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` `(batch, seq)` over the tokens where `mask` is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _nmse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum M‖p - t‖² / sum M‖t‖² over `(batch, seq, n)` tensors (float32)."""
    mask = mask.float()
    error = ((prediction.float() - target.float()).pow(2).sum(-1) * mask).sum()
    scale = (target.float().pow(2).sum(-1) * mask).sum()
    return error / scale.clamp_min(1e-8 * mask.sum().clamp_min(1.0))


# ------------------------------------------------------------------------------------------------------ losses
class DirectMLPLoss(nn.Module):
    """How far the NPT layer's MLP output `y` is from the target `τ` (see the module docstring).

    Args:
        impl: `"nmse"` (scale-invariant, masked) or `"repo"` (MSE / (RMS(τ) + 1e-6), in the units of τ).
    """

    def __init__(self, impl: str = "nmse") -> None:
        super().__init__()
        self.impl = impl

    def forward(self, y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.impl == "repo":
            rms = target.float().pow(2).mean().sqrt()
            return F.mse_loss(y.float(), target.float()) / (rms + 1e-6)
        return _nmse(y, target, mask)


class AttentionEncodingLoss(nn.Module):
    """The repository's attention encoding: `MSE(v_a, a)/(RMS(a)+1e-6) + 0.5 (1 - mean cos(v_a, a))` (masked;
    `v_a` of component 0 of a projection whose input is the hidden state)."""

    def forward(self, v_a: torch.Tensor, attn_output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        v_a, a = v_a.float(), attn_output.float()
        rms = (masked_mean(a.pow(2).mean(-1), mask)).sqrt()
        mse = masked_mean((v_a - a).pow(2).mean(-1), mask)
        cosine = masked_mean(F.cosine_similarity(v_a, a, dim=-1), mask)
        return mse / (rms + 1e-6) + 0.5 * (1.0 - cosine)


class FidelityLoss(nn.Module):
    """Next-token agreement with the teacher.

    Args:
        impl: `"kl"`: KL(p_teacher ‖ p_npt) per valid token (nats), in chunks of `chunk_size` positions;
            `"mse"`: the repository's MSE between the logits.
        chunk_size: positions per chunk of the KL (bounds the float32 softmax memory).
    """

    def __init__(self, impl: str = "kl", chunk_size: int = 256) -> None:
        super().__init__()
        self.impl, self.chunk_size = impl, chunk_size

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.impl == "mse":
            return F.mse_loss(student_logits.float(), teacher_logits.float())
        total = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, student_logits.shape[1], self.chunk_size):
            piece = slice(start, start + self.chunk_size)
            log_q = F.log_softmax(student_logits[:, piece].float(), dim=-1)
            log_p = F.log_softmax(teacher_logits[:, piece].float(), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            total = total + (kl * mask[:, piece].float()).sum()
        return total / mask.float().sum().clamp_min(1.0)


class RegularizationLoss(nn.Module):
    """Size of the generated update.

    Args:
        kind: `"element"`: mean(v_a²) + mean(v_b²) per element (the repository's loss); `"token"`: mean over tokens
            of ‖v_a‖² + ‖v_b‖² (its `NPComponent.get_regularization_loss`); `"delta_norm"`: mean over tokens of
            sum_j ‖v_a_j‖‖v_b_j‖ (invariant to the rescaling (c v_a, v_b / c)); `"modulation"`: mean ‖m‖².
    """

    def __init__(self, kind: str = "element") -> None:
        super().__init__()
        self.kind = kind

    def forward(self, sq_a: torch.Tensor, sq_b: torch.Tensor, in_features: int, out_features: int,
                modulation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`sq_a`, `sq_b`: ‖v_a_j‖², ‖v_b_j‖² `(batch, seq, k)`; `modulation`: m `(batch, seq, n_out)`."""
        k = sq_a.shape[-1]
        if self.kind == "element":
            return masked_mean(sq_a.sum(-1) / (k * in_features), mask) + masked_mean(sq_b.sum(-1) / (k * out_features),
                                                                                      mask)
        if self.kind == "token":
            return masked_mean(sq_a.sum(-1) + sq_b.sum(-1), mask)
        if self.kind == "delta_norm":
            return masked_mean((sq_a.clamp_min(1e-12) * sq_b.clamp_min(1e-12)).sqrt().sum(-1), mask)
        return masked_mean(modulation.float().pow(2).sum(-1), mask)


class ModulationGuidanceLoss(nn.Module):
    """Supervision of the modulation itself.

    Args:
        impl: `"exact"`: NMSE between the modulation `m` and the exact pre-activation change `Δ*` (+ the hinge
            `relu(min_std - std_M(s))`); `"seed"`: the seed's `MSE(σ(v_a·h), σ(‖a‖/‖h‖)) - 0.1 Var(v_a·h)`
            (unbounded below, pads included, broadcasting bug for rank k > 1 kept).
        min_std: the hinge's floor on the standard deviation of the scalars (0 = off).
    """

    def __init__(self, impl: str = "exact", min_std: float = 0.0) -> None:
        super().__init__()
        self.impl, self.min_std = impl, min_std

    def forward(self, modulation: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                scalars: torch.Tensor | None = None) -> torch.Tensor:
        loss = _nmse(modulation, target.detach(), mask)
        if self.min_std > 0 and scalars is not None:
            valid = scalars.float()[mask.bool()]
            loss = loss + F.relu(self.min_std - valid.std(0)).mean()
        return loss

    @staticmethod
    def seed(v_a: torch.Tensor, hidden_states: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The seed's code, verbatim."""
        v_a_dot_h = torch.sum(v_a * hidden_states, dim=-1)
        attention_importance = attention_output.norm(dim=-1) / hidden_states.norm(dim=-1)
        scalar_loss = F.mse_loss(torch.sigmoid(v_a_dot_h), torch.sigmoid(attention_importance))
        variance_loss = -torch.var(v_a_dot_h)
        return scalar_loss + 0.1 * variance_loss


class DecomposedTargetLoss(nn.Module):
    """`"delta"`: NMSE(y - MLP(x), τ - MLP(x)), the part of the target the modulation must add; `"seed"`: the seed's
    decomposition (see `seed_parts`)."""

    def forward(self, y: torch.Tensor, target: torch.Tensor, unmodulated: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return _nmse(y - unmodulated.detach(), target - unmodulated.detach(), mask)

    @staticmethod
    def seed_parts(mlp_modulated: torch.Tensor, attention_output: torch.Tensor,
                   mlp_with_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The seed's code, verbatim: returns `(loss, attention part, MLP part)`; the slice covers all of `y`, so
        the MLP part is identically zero and the loss trains `y ≈ a`."""
        attn_component = mlp_modulated[:, :, :attention_output.size(-1)]
        attn_loss = F.mse_loss(attn_component, attention_output)
        mlp_component = mlp_modulated - attn_component
        mlp_loss = F.mse_loss(mlp_component, mlp_with_attention)
        return 0.5 * attn_loss + 0.5 * mlp_loss, attn_component, mlp_component


class InformationBottleneckLoss(nn.Module):
    """`"rate"`: ½ mean_t ‖z_t‖², the KL of the fixed-variance Gaussian code N(z, I) to the prior N(0, I) (the rate
    of a variational information bottleneck whose distortion is the direct / fidelity loss); always ≥ 0.
    `"seed"`: the seed's `β|cos(v_a, h)| - |cos(v_a, a)|`."""

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return 0.5 * masked_mean(z.float().pow(2).sum(-1), mask)

    @staticmethod
    def seed(v_a: torch.Tensor, attention_output: torch.Tensor, hidden_states: torch.Tensor,
             beta: float = 0.01) -> torch.Tensor:
        """The seed's code, verbatim."""
        h_corr = F.cosine_similarity(v_a, hidden_states, dim=-1).abs().mean()
        attn_corr = F.cosine_similarity(v_a, attention_output, dim=-1).abs().mean()
        return beta * h_corr - attn_corr


class ProjectionConsistencyLoss(nn.Module):
    """`"direction"`: 1 - mean_t cos(m_gate, Δ*_gate), the direction of the signed modulation against the exact
    change of the gate pre-activation; `"seed"`: the seed's consistency + alignment with `W_g a`."""

    def forward(self, modulation: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(modulation.float(), target.detach().float(), dim=-1, eps=1e-8)
        return 1.0 - masked_mean(cosine, mask)

    @staticmethod
    def seed(v_b: torch.Tensor, mlp_gate_weight: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The seed's code, verbatim."""
        gate_correction = F.linear(attention_output, mlp_gate_weight)
        v_b_mean = v_b.mean(dim=1, keepdim=True)
        consistency = F.mse_loss(v_b, v_b_mean.expand_as(v_b))
        alignment = F.cosine_similarity(v_b, gate_correction, dim=-1).mean()
        return consistency + (1 - alignment)


class OrthogonalityLoss(nn.Module):
    """`"pca"`: mean_t ‖normalize(v_a) V_q‖² with `V_q` (n_in, q) the top-q principal directions of the centred
    MLP input over valid tokens, computed without gradient and refreshed every `refresh` calls.
    `"seed"`: the seed's `v_a @ V.T` after `svd_lowrank(h, q=10)`.

    Args:
        components: q.
        refresh: calls between two recomputations of `V_q`.
    """

    def __init__(self, components: int = 10, refresh: int = 100) -> None:
        super().__init__()
        self.components, self.refresh = components, refresh
        self._basis: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}  # per key (layer): calls since that basis was computed

    def forward(self, v_a: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor, key: int = 0) -> torch.Tensor:
        calls = self._calls.get(key, 0)
        if key not in self._basis or calls % self.refresh == 0:
            with torch.no_grad():
                x = inputs.detach().float()[mask.bool()]
                x = x - x.mean(0)
                q = min(self.components, x.shape[0] - 1, x.shape[1])  # centring removes one dimension
                self._basis[key] = torch.linalg.svd(x, full_matrices=False).Vh[:q].T
        self._calls[key] = calls + 1
        projection = F.normalize(v_a.float(), dim=-1) @ self._basis[key]
        return masked_mean(projection.pow(2).sum(-1), mask)

    @staticmethod
    def seed(v_a: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The seed's code, verbatim (raises a shape error unless hidden_size == 10)."""
        h_flat = hidden_states.reshape(-1, hidden_states.size(-1))
        u, s, v = torch.svd_lowrank(h_flat, q=10)
        v_a_flat = v_a.reshape(-1, v_a.size(-1))
        projections = v_a_flat @ v.T
        return projections.pow(2).mean() * 0.01


class CurriculumMask:
    """The seed's curriculum on the attention-output norm: before `steps[0]` keep tokens with ‖a‖ below the
    `quantiles[0]` quantile, before `steps[1]` below `quantiles[1]`, then all.

    Args:
        impl: `"valid"`: quantiles over valid tokens, in float32 (the fix); `"seed"`: over every position, pads
            included.
    """

    def __init__(self, impl: str = "valid", quantiles: Sequence[float] = (0.3, 0.7),
                 steps: Sequence[int] = (500, 1000)) -> None:
        self.impl, self.quantiles, self.steps = impl, tuple(quantiles), tuple(steps)

    def __call__(self, attn_output: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        stage = next((i for i, limit in enumerate(self.steps) if step < limit), None)
        if stage is None:
            return mask
        norms = attn_output.detach().float().norm(dim=-1)
        pool = norms[mask.bool()] if self.impl == "valid" else norms.flatten()
        threshold = torch.quantile(pool, self.quantiles[stage])
        return mask & (norms < threshold)


class StageSchedule:
    """Weights of the four repository losses by step (`S = stage1_steps`).

    `repo` (exact): step < S: direct 0.1, attention 0.8, fidelity 0.1, regularisation 0.01; S ≤ step < 3S:
    p = (step - S)/(2S), direct 0.1 + 0.4p, attention 0.8 - 0.5p, fidelity 0.1 + 0.2p; from 3S: direct 10,
    attention 1.0, fidelity 1.0 (a jump: ×20 on direct). `smooth`: the same stage 1, then a linear ramp that ends at
    the stage-3 weights. `none`: the static weights. `stage` is 1, 2 or 3 (1 for `none`).
    """

    STAGE1 = {"direct": 0.1, "attention": 0.8, "fidelity": 0.1, "regularization": 0.01}
    STAGE3 = {"direct": 10.0, "attention": 1.0, "fidelity": 1.0, "regularization": 0.01}

    def __init__(self, kind: str = "none", stage1_steps: int = 1000, static: Mapping[str, float] | None = None):
        self.kind, self.stage1_steps, self.static = kind, stage1_steps, dict(static or {})

    def __call__(self, step: int) -> tuple[dict[str, float], int]:
        weights = dict(self.static)
        if self.kind == "none":
            return weights, 1
        s = self.stage1_steps
        if step < s:
            weights.update(self.STAGE1)
            return weights, 1
        if step >= 3 * s:
            weights.update(self.STAGE3)
            return weights, 3
        p = (step - s) / (2 * s)
        if self.kind == "repo":
            weights.update(direct=0.1 + 0.4 * p, attention=0.8 - 0.5 * p, fidelity=0.1 + 0.2 * p,
                           regularization=0.01)
        else:
            weights.update({name: (1 - p) * self.STAGE1[name] + p * self.STAGE3[name] for name in self.STAGE1})
        return weights, 2


# ------------------------------------------------------------------------------------------ adaptive weighting
def _grad_norm(loss: torch.Tensor, parameters: Sequence[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    zero = torch.zeros((), device=parameters[0].device if parameters else None)
    return torch.sqrt(sum((g.float().pow(2).sum() for g in grads if g is not None), zero))


class InverseGradNormWeighting(nn.Module):
    """Per-loss gradient-norm balancing on the shared (NP) parameters: every `every` steps g_i = ‖∇θ L_i‖, EMA
    ḡ_i (β), w_i = π_i · mean(ḡ)/(ḡ_i + ε), clipped to [0.1 π_i, 10 π_i] and rescaled so that sum w = sum π."""

    def __init__(self, every: int = 10, beta: float = 0.9) -> None:
        super().__init__()
        self.every, self.beta = every, beta
        self.ema: dict[str, float] = {}
        self.factors: dict[str, float] = {}

    def forward(self, losses: Mapping[str, torch.Tensor], priors: Mapping[str, float],
                parameters: Sequence[nn.Parameter], step: int) -> dict[str, float]:
        names = list(losses)
        if names and (step % self.every == 0 or not self.factors) and torch.is_grad_enabled():
            for name in names:
                norm = float(_grad_norm(losses[name], parameters))
                self.ema[name] = norm if name not in self.ema else self.beta * self.ema[name] + (1 - self.beta) * norm
            mean = sum(self.ema[n] for n in names) / len(names)
            raw = {n: min(max(mean / (self.ema[n] + 1e-12), 0.1), 10.0) for n in names}
            scale = sum(priors[n] for n in names) / sum(priors[n] * raw[n] for n in names)
            self.factors = {n: raw[n] * scale for n in names}
        return {n: priors[n] * self.factors.get(n, 1.0) for n in names}


class GradNormWeighting(nn.Module):
    """GradNorm (Chen et al. 2018): learnable w_i (sum w = n), G_i = ‖∇θ(π_i w_i L_i)‖, r_i = (L_i/L_i(0)) /
    mean_j(L_j/L_j(0)), L_grad = sum_i |G_i - mean(G)·r_i^α| with the target detached; w has its own Adam step."""

    def __init__(self, names: Sequence[str], alpha: float = 1.5, lr: float = 0.025, every: int = 1) -> None:
        super().__init__()
        self.names, self.alpha, self.every = list(names), alpha, every
        self.weights = nn.Parameter(torch.ones(len(self.names)))
        self.optimizer = torch.optim.Adam([self.weights], lr=lr)
        self.initial: dict[str, float] = {}

    def forward(self, losses: Mapping[str, torch.Tensor], priors: Mapping[str, float],
                parameters: Sequence[nn.Parameter], step: int) -> dict[str, float]:
        names = [n for n in self.names if n in losses]
        if names and step % self.every == 0 and torch.is_grad_enabled():
            for n in names:
                self.initial.setdefault(n, max(float(losses[n].detach()), 1e-12))
            index = [self.names.index(n) for n in names]
            norms = torch.stack([_grad_norm(priors[n] * losses[n], parameters) for n in names])
            weighted = self.weights[index] * norms
            ratios = torch.tensor([float(losses[n].detach()) / self.initial[n] for n in names], device=norms.device)
            ratios = ratios / ratios.mean()
            target = (weighted.mean() * ratios.pow(self.alpha)).detach()
            self.optimizer.zero_grad()
            (weighted - target).abs().sum().backward(inputs=[self.weights])
            self.optimizer.step()
            with torch.no_grad():
                self.weights.clamp_(min=1e-3)
                self.weights.mul_(len(self.names) / self.weights.sum())
        return {n: priors[n] * float(self.weights[self.names.index(n)].detach()) for n in names}


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018): L = sum_i ½ e^{-σ_i} π_i L_i + ½ σ_i with learnable
    log-variances σ_i (trained with the NP parameters, no weight decay). Needs L_i ≥ 0."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def combine(self, losses: Mapping[str, torch.Tensor], priors: Mapping[str, float]) -> torch.Tensor:
        total = self.log_vars.new_zeros(())
        for name, loss in losses.items():
            sigma = self.log_vars[self.names.index(name)]
            total = total + 0.5 * torch.exp(-sigma) * priors[name] * loss + 0.5 * sigma
        return total

    def effective_weights(self, priors: Mapping[str, float], names: Iterable[str]) -> dict[str, float]:
        return {n: 0.5 * priors[n] * math.exp(-float(self.log_vars[self.names.index(n)].detach())) for n in names}


class SeedAdaptiveWeighting:
    """The seed's `AdaptiveLossWeighting`, verbatim: the gradient of each loss with respect to *itself* is 1, so
    the weights are always uniform (1/n), whatever the losses."""

    def __init__(self, num_losses: int = 4) -> None:
        self.loss_weights = torch.ones(num_losses)
        self.grad_norms = torch.zeros(num_losses)
        self.alpha = 0.9

    def update_weights(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            for i, loss in enumerate(losses):
                grad = torch.autograd.grad(loss, loss, retain_graph=True)[0]
                self.grad_norms[i] = self.alpha * self.grad_norms[i] + (1 - self.alpha) * grad.norm()
            mean_norm = self.grad_norms.mean()
            self.loss_weights = mean_norm / (self.grad_norms + 1e-6)
            self.loss_weights = self.loss_weights / self.loss_weights.sum()
        return self.loss_weights


# ---------------------------------------------------------------------------------------------- teacher capture
@dataclass
class TeacherLayer:
    """The base layer's tensors, `(batch, seq, ·)`: input, attention output `a`, MLP input `LN2(h + a)`, MLP output,
    layer output."""

    hidden_in: torch.Tensor
    attn_output: torch.Tensor
    mlp_input: torch.Tensor
    mlp_output: torch.Tensor
    hidden_out: torch.Tensor


@dataclass
class TeacherCapture:
    """The teacher's layers (by index) and its logits `(batch, seq, vocab)`."""

    layers: dict[int, TeacherLayer]
    logits: torch.Tensor


@torch.no_grad()
def capture_teacher(model: NPTForCausalLM, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.LongTensor | None = None, layers: Sequence[int] | None = None
                    ) -> TeacherCapture:
    """Run the base model (`npt_disabled()`) once and capture, with hooks on the real forward pass, the tensors of
    `layers` (default: the NPT layers). The hooks exist only during this call."""
    layers = list(model.npt_layers) if layers is None else list(layers)
    store: dict[int, dict[str, torch.Tensor]] = {index: {} for index in layers}
    handles = []

    def keep(index: int, name: str, value: torch.Tensor) -> None:
        store[index][name] = value

    try:
        for index in layers:
            layer = model.model.layers[index]
            handles += [
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, i=index: keep(i, "hidden_in", args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True),
                layer.self_attn.register_forward_hook(lambda m, args, out, i=index: keep(i, "attn_output", out[0])),
                layer.mlp.register_forward_pre_hook(lambda m, args, i=index: keep(i, "mlp_input", args[0])),
                layer.mlp.register_forward_hook(lambda m, args, out, i=index: keep(i, "mlp_output", out)),
                layer.register_forward_hook(lambda m, args, out, i=index: keep(i, "hidden_out", out)),
            ]
        with model.npt_disabled():
            logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return TeacherCapture(layers={index: TeacherLayer(**values) for index, values in store.items()}, logits=logits)


# ---------------------------------------------------------------------------------------------- the loss module
@dataclass
class NPTLossOptions:
    """Options of the NPT objective (`--objective_args key=value,...`).

    `losses` is a `+`-joined subset of `direct, attention, fidelity, regularization, mg, decomposed, ib, projection,
    orthogonality` (or a JSON list); each loss's `*_impl` chooses the sound version (default) or the seed's
    (`seed`) / the repository's (`repo`, `mse`); `weight_*` are the static weights (the schedule overrides the
    first four); `adaptive` is `none`, `invgrad`, `gradnorm`, `uncertainty` or `seed`.
    """

    losses: str | list[str] = "direct+fidelity+regularization"
    direct_impl: str = "nmse"
    fidelity_impl: str = "kl"
    reg_kind: str = "element"
    mg_impl: str = "exact"
    mg_min_std: float = 0.0
    decomposed_impl: str = "delta"
    ib_impl: str = "rate"
    ib_beta: float = 0.01
    projection_impl: str = "direction"
    orth_impl: str = "pca"
    orth_components: int = 10
    orth_refresh: int = 100
    curriculum: str = "none"
    curriculum_steps: list[int] = field(default_factory=lambda: [500, 1000])
    curriculum_quantiles: list[float] = field(default_factory=lambda: [0.3, 0.7])
    schedule: str = "none"
    stage1_steps: int = 1000
    weight_direct: float = 1.0
    weight_attention: float = 1.0
    weight_fidelity: float = 1.0
    weight_regularization: float = 0.01
    weight_mg: float = 2.0
    weight_decomposed: float = 1.0
    weight_ib: float = 0.5
    weight_projection: float = 1.0
    weight_orthogonality: float = 0.01
    adaptive: str = "none"
    adaptive_every: int = 10
    adaptive_beta: float = 0.9
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025

    CHOICES = {
        "direct_impl": ("nmse", "repo"), "fidelity_impl": ("kl", "mse"),
        "reg_kind": ("element", "token", "delta_norm", "modulation"), "mg_impl": ("exact", "seed"),
        "decomposed_impl": ("delta", "seed"), "ib_impl": ("rate", "seed"), "projection_impl": ("direction", "seed"),
        "orth_impl": ("pca", "seed"), "curriculum": ("none", "valid", "seed"), "schedule": ("none", "repo", "smooth"),
        "adaptive": ("none", "invgrad", "gradnorm", "uncertainty", "seed"),
    }

    def __post_init__(self) -> None:
        if isinstance(self.losses, str):
            self.losses = [name.strip() for name in self.losses.split("+") if name.strip()]
        unknown = sorted(set(self.losses) - set(LOSS_NAMES))
        if unknown or not self.losses:
            raise ValueError(f"`losses` must be a '+'-joined subset of {LOSS_NAMES}, got {self.losses!r}")
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {getattr(self, name)!r}")
        if self.adaptive == "uncertainty":
            seedy = [n for n in self.losses if self.impl_is_seed(n)]
            if seedy:
                raise ValueError(f"`adaptive`=uncertainty needs non-negative losses; {seedy} use the seed version")

    def impl_is_seed(self, name: str) -> bool:
        """Whether loss `name` runs the seed's version (which may be negative)."""
        attr = {"mg": "mg_impl", "decomposed": "decomposed_impl", "ib": "ib_impl", "projection": "projection_impl",
                "orthogonality": "orth_impl"}.get(name)
        return attr is not None and getattr(self, attr) == "seed"

    @classmethod
    def from_args(cls, objective_args: Mapping[str, Any]) -> NPTLossOptions:
        """Build from parsed `--objective_args`.

        Raises:
            ValueError: an unknown option or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(objective_args) - known)
        if unknown:
            raise ValueError(f"unknown NPT objective argument(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**dict(objective_args))


@dataclass
class NPTLossOutput:
    """The objective's result: the total (to backpropagate), each component (averaged over NPT layers, before
    weighting), the weights applied, and detached metrics."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    weights: dict[str, float]
    metrics: dict[str, float]


class NPTLossModule(nn.Module):
    """Combines the chosen losses over every NPT layer with the schedule and the adaptive weighting.

    Args:
        options: the `NPTLossOptions`.
    """

    def __init__(self, options: NPTLossOptions | None = None) -> None:
        super().__init__()
        self.options = options = options or NPTLossOptions()
        self.direct = DirectMLPLoss(options.direct_impl)
        self.attention = AttentionEncodingLoss()
        self.fidelity = FidelityLoss(options.fidelity_impl)
        self.regularization = RegularizationLoss(options.reg_kind)
        self.mg = ModulationGuidanceLoss(options.mg_impl, options.mg_min_std)
        self.decomposed = DecomposedTargetLoss()
        self.ib = InformationBottleneckLoss()
        self.projection = ProjectionConsistencyLoss()
        self.orthogonality = OrthogonalityLoss(options.orth_components, options.orth_refresh)
        self.curriculum = None if options.curriculum == "none" else CurriculumMask(
            options.curriculum, options.curriculum_quantiles, options.curriculum_steps)
        self.schedule = StageSchedule(options.schedule, options.stage1_steps,
                                      {name: getattr(options, f"weight_{name}") for name in LOSS_NAMES})
        balanced = [n for n in options.losses if n not in _NEVER_BALANCED and not options.impl_is_seed(n)]
        self.balanced = balanced
        self.invgrad = InverseGradNormWeighting(options.adaptive_every, options.adaptive_beta) \
            if options.adaptive == "invgrad" else None
        self.gradnorm = GradNormWeighting(balanced, options.gradnorm_alpha, options.gradnorm_lr, options.adaptive_every) \
            if options.adaptive == "gradnorm" else None
        self.uncertainty = UncertaintyWeighting(balanced) if options.adaptive == "uncertainty" else None
        self.seed_weighting = SeedAdaptiveWeighting(len(options.losses)) if options.adaptive == "seed" else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the model's optimizer must also train (the uncertainty log-variances)."""
        return [self.uncertainty.log_vars] if self.uncertainty is not None else []

    def weighting_state(self) -> dict[str, Any]:
        """The adaptive weighting's learned state (JSON-serialisable; empty for static weights), which a resumed run
        must get back: uncertainty log-variances, GradNorm weights and initial losses, inverse-gradient EMAs.
        (GradNorm's own Adam moments are not kept: they restart on resume.)"""
        state: dict[str, Any] = {}
        if self.uncertainty is not None:
            state["uncertainty_log_vars"] = self.uncertainty.log_vars.detach().cpu().tolist()
        if self.gradnorm is not None:
            state["gradnorm_weights"] = self.gradnorm.weights.detach().cpu().tolist()
            state["gradnorm_initial"] = dict(self.gradnorm.initial)
        if self.invgrad is not None:
            state["invgrad_ema"], state["invgrad_factors"] = dict(self.invgrad.ema), dict(self.invgrad.factors)
        return state

    @torch.no_grad()
    def load_weighting_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `weighting_state` returned."""
        if self.uncertainty is not None and "uncertainty_log_vars" in state:
            self.uncertainty.log_vars.copy_(torch.tensor(state["uncertainty_log_vars"]))
        if self.gradnorm is not None and "gradnorm_weights" in state:
            self.gradnorm.weights.copy_(torch.tensor(state["gradnorm_weights"]))
            self.gradnorm.initial = dict(state["gradnorm_initial"])
        if self.invgrad is not None and "invgrad_ema" in state:
            self.invgrad.ema, self.invgrad.factors = dict(state["invgrad_ema"]), dict(state["invgrad_factors"])

    @staticmethod
    def direct_target(model: NPTForCausalLM, teacher: TeacherLayer) -> torch.Tensor:
        """τ: what `y` (the NPT layer's MLP output) must equal for the layer output to match the teacher's."""
        if model.config.np_residual_mode == "replace":
            return teacher.attn_output + teacher.mlp_output
        return teacher.mlp_output

    @staticmethod
    @torch.no_grad()
    def exact_modulation_targets(layer: nn.Module, record: NPTLayerRecord, teacher: TeacherLayer,
                                 target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Δ* per modulated projection: `W_g(LN2(h+a) - x)`, `W_u(LN2(h+a) - x)` and, for down,
        `τ - W_d i` with `τ` the direct target (`direct_target`: `a + MLP(LN2(h+a))` in replace mode) and `i` the
        student's modulated intermediate.

        Gate and up targets make the MLP output `MLP(LN2(h+a))`: the whole target in keep mode; in replace mode the
        `+a` term is left to the down modulation (`gate_up_down`), since no gate/up modulation can add it exactly."""
        difference = (teacher.mlp_input - record.mlp_input).float()
        targets = {}
        for name, proj in record.projections.items():
            if name == "down":
                targets[name] = (target.float() - layer.mlp.down_proj(proj.q).float())
            else:
                targets[name] = F.linear(difference, getattr(layer.mlp, f"{name}_proj").weight.float())
        return targets

    def forward(self, model: NPTForCausalLM, records: Mapping[int, NPTLayerRecord], teacher: TeacherCapture,
                student_logits: torch.Tensor, mask: torch.Tensor, step: int = 0) -> NPTLossOutput:
        """Compute every chosen loss (mean over NPT layers), weight and sum them.

        Args:
            model: the NPT model (for the frozen MLP weights and the NP parameters).
            records: the student's `output_npt` records.
            teacher: `capture_teacher`'s result on the same batch.
            student_logits: the student's logits `(batch, seq, vocab)`.
            mask: valid tokens `(batch, seq)` (bool).
            step: the optimizer step (schedule, curriculum, adaptive weighting).
        """
        options, chosen = self.options, self.options.losses
        mask = mask.bool()
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for index, record in records.items():
            layer, tea = model.model.layers[index], teacher.layers[index]
            local = self.curriculum(tea.attn_output, mask, step) if self.curriculum is not None else mask
            target = self.direct_target(model, tea)
            first = next(iter(record.projections.values()))
            hidden_proj = next((p for p in record.projections.values()
                                if p.modulator.in_features == model.config.hidden_size), first)
            parts: dict[str, torch.Tensor] = {}
            needs_vectors = "attention" in chosen or "orthogonality" in chosen or any(
                options.impl_is_seed(n) for n in ("mg", "ib", "projection") if n in chosen)
            v_a = v_b = None
            if needs_vectors:
                v_a, v_b = hidden_proj.modulator.vectors(hidden_proj.z)
                v_a, v_b = v_a[..., 0, :], v_b[..., 0, :]
            if "direct" in chosen:
                parts["direct"] = self.direct(record.mlp_output, target, local)
            if "attention" in chosen:
                parts["attention"] = self.attention(v_a, tea.attn_output, local)
            if "fidelity" in chosen:
                parts["fidelity"] = self.fidelity(student_logits, teacher.logits, mask)
            if "regularization" in chosen:
                reg = []
                for proj in record.projections.values():
                    sq_a, sq_b = proj.modulator.squared_norms(proj.z)
                    reg.append(self.regularization(sq_a, sq_b, proj.modulator.in_features,
                                                   proj.modulator.out_features, proj.m, local))
                parts["regularization"] = torch.stack(reg).sum()
            exact = None
            if ("mg" in chosen and options.mg_impl == "exact") or (
                    "projection" in chosen and options.projection_impl == "direction"):
                exact = self.exact_modulation_targets(layer, record, tea, target)
            if "mg" in chosen:
                if options.mg_impl == "seed":
                    parts["mg"] = self.mg.seed(v_a, tea.hidden_in.float(), tea.attn_output.float())
                else:
                    parts["mg"] = torch.stack([self.mg(proj.m, exact[name], local, proj.s)
                                               for name, proj in record.projections.items()]).mean()
            if "decomposed" in chosen:
                if options.decomposed_impl == "seed":
                    parts["decomposed"] = self.decomposed.seed_parts(record.mlp_output.float(),
                                                                     tea.attn_output.float(), tea.mlp_output.float())[0]
                else:
                    with torch.no_grad():
                        unmodulated = layer.mlp(record.mlp_input)
                    parts["decomposed"] = self.decomposed(record.mlp_output, target, unmodulated, local)
            if "ib" in chosen:
                parts["ib"] = (self.ib.seed(v_a, tea.attn_output.float(), tea.hidden_in.float(), options.ib_beta)
                               if options.ib_impl == "seed" else
                               torch.stack([self.ib(p.z, local) for p in record.projections.values()]).mean())
            if "projection" in chosen:
                if options.projection_impl == "seed":
                    parts["projection"] = self.projection.seed(v_b.float(), layer.mlp.gate_proj.weight.float(),
                                                               tea.attn_output.float())
                else:
                    name = "gate" if "gate" in record.projections else next(iter(record.projections))
                    parts["projection"] = self.projection(record.projections[name].m, exact[name], local)
            if "orthogonality" in chosen:
                parts["orthogonality"] = (self.orthogonality.seed(v_a, tea.hidden_in.float())
                                          if options.orth_impl == "seed" else
                                          self.orthogonality(v_a, record.mlp_input, local, key=index))
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value / len(records)
            with torch.no_grad():
                s = first.s.float()[mask]
                metrics[f"s_var_l{index}"] = float(s.var()) if s.numel() > 1 else 0.0
                metrics[f"s_small_l{index}"] = float((s.abs() < 1e-3).float().mean())
        weights, stage = self.schedule(step)
        priors = {name: weights[name] for name in sums}
        total, applied = self._combine(model, sums, priors, step)
        metrics["stage"] = float(stage)
        return NPTLossOutput(total=total, components=sums, weights=applied, metrics=metrics)

    def _combine(self, model: NPTForCausalLM, losses: dict[str, torch.Tensor], priors: dict[str, float],
                 step: int) -> tuple[torch.Tensor, dict[str, float]]:
        fixed = {n: priors[n] for n in losses if n not in self.balanced}
        balanced = {n: losses[n] for n in losses if n in self.balanced}
        parameters = [p for _, p in model.np_parameters() if p.requires_grad]
        if self.seed_weighting is not None:
            # The seed's code takes a gradient (and crashes without autograd); its weights are always uniform.
            seed_weights = (self.seed_weighting.update_weights(list(losses.values())) if torch.is_grad_enabled()
                            else [1.0 / len(losses)] * len(losses))
            applied = {n: float(w) for n, w in zip(losses, seed_weights)}
            return sum(applied[n] * losses[n] for n in losses), applied
        if self.uncertainty is not None:
            total = self.uncertainty.combine(balanced, priors) + sum(fixed[n] * losses[n] for n in fixed)
            return total, {**fixed, **self.uncertainty.effective_weights(priors, balanced)}
        if self.invgrad is not None and parameters:
            applied = {**fixed, **self.invgrad(balanced, priors, parameters, step)}
        elif self.gradnorm is not None and parameters:
            applied = {**fixed, **self.gradnorm(balanced, priors, parameters, step)}
        else:
            applied = dict(priors)
        return sum(applied[n] * losses[n] for n in losses), applied


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_npt(model: NPTForCausalLM, blocks: Iterable[Mapping[str, Any]], batch_size: int = 8,
                 max_batches: int | None = None) -> dict[str, float]:
    """Held-out fidelity of an NPT model to its base on packed blocks (`input_ids`, optional `attention_mask`).

    Returns: `kl` (KL(teacher ‖ NPT), nats/token), `top1` (agreement of the argmax), `ppl_base`, `ppl_npt`,
    `ppl_drop` (NPT structure with the modulation off: replace → attention deleted), `recovery`
    R = (PPL_drop - PPL_npt)/(PPL_drop - PPL_base) (0: no better than deleting attention, 1: the base),
    `direct_nmse` and `s_var` (variance of the scalars s over valid tokens, first NPT layer, first projection),
    `cos_va_a` (the repository's attention similarity, mean cos(v_a, a)).
    """
    was_training = model.training
    model.eval()
    rows = list(blocks)
    totals = {"kl": 0.0, "top1": 0.0, "nll_base": 0.0, "nll_npt": 0.0, "nll_drop": 0.0, "err": 0.0, "ref": 0.0,
              "cos": 0.0, "tokens": 0.0, "targets": 0.0}
    scalars = []
    for batch_index, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            break
        batch = rows[start:start + batch_size]
        input_ids = torch.tensor([row["input_ids"] for row in batch], device=model.device)
        attention_mask = torch.tensor([row["attention_mask"] for row in batch], device=model.device) \
            if "attention_mask" in batch[0] else torch.ones_like(input_ids)
        mask = attention_mask.bool()
        teacher = capture_teacher(model, input_ids, attention_mask)
        student = model(input_ids, attention_mask=attention_mask, output_npt=True, use_cache=False)
        with model.npt_alpha(0.0):
            dropped = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        log_p = F.log_softmax(teacher.logits.float(), -1)
        log_q = F.log_softmax(student.logits.float(), -1)
        totals["kl"] += float(((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum())
        totals["top1"] += float(((log_p.argmax(-1) == log_q.argmax(-1)) & mask).sum())
        totals["tokens"] += float(mask.sum())
        targets = input_ids[:, 1:]
        target_mask = (mask[:, 1:] & mask[:, :-1]).float()
        for key, logits in (("nll_base", teacher.logits), ("nll_npt", student.logits), ("nll_drop", dropped)):
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            totals[key] += float((nll * target_mask).sum())
        totals["targets"] += float(target_mask.sum())
        for index, record in student.npt.items():
            target = NPTLossModule.direct_target(model, teacher.layers[index])
            totals["err"] += float(((record.mlp_output.float() - target.float()).pow(2).sum(-1) * mask).sum())
            totals["ref"] += float((target.float().pow(2).sum(-1) * mask).sum())
        first_layer = student.npt[min(student.npt)]
        proj = next(iter(first_layer.projections.values()))
        scalars.append(proj.s[..., 0].float()[mask])
        if proj.modulator.in_features == model.config.hidden_size:
            v_a = proj.modulator.vectors(proj.z)[0][..., 0, :]
            totals["cos"] += float((F.cosine_similarity(v_a.float(), first_layer.attn_output.float(), dim=-1)
                                    * mask).sum())
    model.train(was_training)
    ppl = {key: math.exp(totals[f"nll_{key}"] / max(totals["targets"], 1.0)) for key in ("base", "npt", "drop")}
    gap = ppl["drop"] - ppl["base"]
    s = torch.cat(scalars)
    return {
        "kl": totals["kl"] / totals["tokens"],
        "top1": totals["top1"] / totals["tokens"],
        "ppl_base": ppl["base"], "ppl_npt": ppl["npt"], "ppl_drop": ppl["drop"],
        "recovery": (ppl["drop"] - ppl["npt"]) / gap if abs(gap) > 1e-12 else float("nan"),
        "direct_nmse": totals["err"] / max(totals["ref"], 1e-12),
        "s_var": float(s.var()) if s.numel() > 1 else 0.0,
        "cos_va_a": totals["cos"] / totals["tokens"],
    }


# ------------------------------------------------------------------------------------------------- the trainer
class NPTTrainer(ZooTrainer):
    """Distils the NPT layers of an `NPTForCausalLM` from its own base (teacher = `npt_disabled()`): only the NP
    parameters (and the uncertainty log-variances) train. Each loss component, its weight, the stage and scalar
    statistics are logged as `loss_<name>`, `loss_weight_<name>`, `loss_stage`, `loss_s_var_l<i>`.

    In evaluation the loss is the NPT model's next-token cross-entropy (so the CLI's perplexity is the NPT model's,
    not an exponentiated distillation loss); `evaluate_npt` gives the fidelity metrics.

    Args:
        loss_module: the `NPTLossModule` (default options when omitted).
    """

    def __init__(self, *args: Any, loss_module: NPTLossModule | None = None, **kwargs: Any) -> None:
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        if not isinstance(model, NPTForCausalLM):
            raise ValueError(f"NPTTrainer trains an NPTForCausalLM, got {type(model).__name__}")
        freeze_base(model)
        super().__init__(*args, **kwargs)
        # its adaptive weights (GradNorm, uncertainty log-variances) live beside the model's parameters
        self.loss_module = (loss_module or NPTLossModule()).to(self.args.device)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        state = self.loss_module.weighting_state()
        if state:
            path = Path(output_dir or self.args.output_dir) / LOSS_WEIGHTING_FILE
            path.write_text(json.dumps(state), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / LOSS_WEIGHTING_FILE
        if path.is_file():
            self.loss_module.load_weighting_state(json.loads(path.read_text(encoding="utf-8")))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        extra = self.loss_module.trainable_parameters()
        if extra:
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        npt_model = self.accelerator.unwrap_model(model)
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if not model.training and "labels" in inputs:
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=inputs["labels"],
                           use_cache=False)
            return (output.loss, {"logits": output.logits}) if return_outputs else output.loss
        teacher = capture_teacher(npt_model, input_ids, attention_mask, inputs.get("position_ids"))
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=inputs.get("position_ids"),
                       output_npt=True, use_cache=False)
        result = self.loss_module(npt_model, output.npt, teacher, output.logits, mask, step=self.state.global_step)
        self.record_loss_components(
            **result.components,
            **{f"weight_{name}": value for name, value in result.weights.items()},
            **result.metrics,
        )
        return (result.total, {"logits": output.logits}) if return_outputs else result.total

    @classmethod
    def from_cli(
        cls,
        *,
        model: PreTrainedModel,
        args: TrainingArguments,
        tokenizer: PreTrainedTokenizerBase,
        train_dataset: Dataset,
        eval_dataset: Dataset,
        objective_args: Mapping[str, Any],
        train_texts: Dataset,
    ) -> NPTTrainer:
        """The trainer of `python -m training.train --model_type npt_llama` (see `NPTLossOptions` for the
        `--objective_args`)."""
        options = NPTLossOptions.from_args(objective_args)
        return cls(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=default_data_collator,
            loss_module=NPTLossModule(options),
        )


def freeze_base(model: NPTForCausalLM) -> list[str]:
    """Make only the NP-component parameters trainable; returns their names."""
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".np_component." in name)
        if parameter.requires_grad:
            names.append(name)
    return names


__all__ = [
    "AttentionEncodingLoss",
    "CurriculumMask",
    "DecomposedTargetLoss",
    "DirectMLPLoss",
    "FidelityLoss",
    "GradNormWeighting",
    "InformationBottleneckLoss",
    "InverseGradNormWeighting",
    "ModulationGuidanceLoss",
    "NPTLossModule",
    "NPTLossOptions",
    "NPTLossOutput",
    "NPTTrainer",
    "OrthogonalityLoss",
    "ProjectionConsistencyLoss",
    "RegularizationLoss",
    "SeedAdaptiveWeighting",
    "StageSchedule",
    "TeacherCapture",
    "TeacherLayer",
    "UncertaintyWeighting",
    "capture_teacher",
    "evaluate_npt",
    "freeze_base",
]
