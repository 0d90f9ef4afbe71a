"""The NPT losses (the repository's, the proposals in their original code and the sound versions), the curriculum mask
and the stage schedule; see `training.npt` for the formulas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
            `relu(min_std - std_M(s))`); `"original"`: the original code's `MSE(σ(v_a·h), σ(‖a‖/‖h‖)) - 0.1 Var(v_a·h)`
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
    def original(v_a: torch.Tensor, hidden_states: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The original code, verbatim."""
        v_a_dot_h = torch.sum(v_a * hidden_states, dim=-1)
        attention_importance = attention_output.norm(dim=-1) / hidden_states.norm(dim=-1)
        scalar_loss = F.mse_loss(torch.sigmoid(v_a_dot_h), torch.sigmoid(attention_importance))
        variance_loss = -torch.var(v_a_dot_h)
        return scalar_loss + 0.1 * variance_loss


class DecomposedTargetLoss(nn.Module):
    """`"delta"`: NMSE(y - MLP(x), τ - MLP(x)), the part of the target the modulation must add; `"original"`: the
    original code's decomposition (see `original_parts`)."""

    def forward(self, y: torch.Tensor, target: torch.Tensor, unmodulated: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return _nmse(y - unmodulated.detach(), target - unmodulated.detach(), mask)

    @staticmethod
    def original_parts(mlp_modulated: torch.Tensor, attention_output: torch.Tensor,
                   mlp_with_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original code, verbatim: returns `(loss, attention part, MLP part)`; the slice covers all of `y`, so
        the MLP part is identically zero and the loss trains `y ≈ a`."""
        attn_component = mlp_modulated[:, :, :attention_output.size(-1)]
        attn_loss = F.mse_loss(attn_component, attention_output)
        mlp_component = mlp_modulated - attn_component
        mlp_loss = F.mse_loss(mlp_component, mlp_with_attention)
        return 0.5 * attn_loss + 0.5 * mlp_loss, attn_component, mlp_component


class InformationBottleneckLoss(nn.Module):
    """`"rate"`: ½ mean_t ‖z_t‖², the KL of the fixed-variance Gaussian code N(z, I) to the prior N(0, I) (the rate
    of a variational information bottleneck whose distortion is the direct / fidelity loss); always ≥ 0.
    `"original"`: the original code's `β|cos(v_a, h)| - |cos(v_a, a)|`."""

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return 0.5 * masked_mean(z.float().pow(2).sum(-1), mask)

    @staticmethod
    def original(v_a: torch.Tensor, attention_output: torch.Tensor, hidden_states: torch.Tensor,
             beta: float = 0.01) -> torch.Tensor:
        """The original code, verbatim."""
        h_corr = F.cosine_similarity(v_a, hidden_states, dim=-1).abs().mean()
        attn_corr = F.cosine_similarity(v_a, attention_output, dim=-1).abs().mean()
        return beta * h_corr - attn_corr


class ProjectionConsistencyLoss(nn.Module):
    """`"direction"`: 1 - mean_t cos(m_gate, Δ*_gate), the direction of the signed modulation against the exact
    change of the gate pre-activation; `"original"`: the original code's consistency + alignment with `W_g a`."""

    def forward(self, modulation: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(modulation.float(), target.detach().float(), dim=-1, eps=1e-8)
        return 1.0 - masked_mean(cosine, mask)

    @staticmethod
    def original(v_b: torch.Tensor, mlp_gate_weight: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The original code, verbatim."""
        gate_correction = F.linear(attention_output, mlp_gate_weight)
        v_b_mean = v_b.mean(dim=1, keepdim=True)
        consistency = F.mse_loss(v_b, v_b_mean.expand_as(v_b))
        alignment = F.cosine_similarity(v_b, gate_correction, dim=-1).mean()
        return consistency + (1 - alignment)


class OrthogonalityLoss(nn.Module):
    """`"pca"`: mean_t ‖normalize(v_a) V_q‖² with `V_q` (n_in, q) the top-q principal directions of the centred
    MLP input over valid tokens, computed without gradient and refreshed every `refresh` calls.
    `"original"`: the original code's `v_a @ V.T` after `svd_lowrank(h, q=10)`.

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
    def original(v_a: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The original code, verbatim (raises a shape error unless hidden_size == 10)."""
        h_flat = hidden_states.reshape(-1, hidden_states.size(-1))
        u, s, v = torch.svd_lowrank(h_flat, q=10)
        v_a_flat = v_a.reshape(-1, v_a.size(-1))
        projections = v_a_flat @ v.T
        return projections.pow(2).mean() * 0.01


class CurriculumMask:
    """The original code's curriculum on the attention-output norm: before `steps[0]` keep tokens with ‖a‖ below the
    `quantiles[0]` quantile, before `steps[1]` below `quantiles[1]`, then all.

    Args:
        impl: `"valid"`: quantiles over valid tokens, in float32 (the fix); `"original"`: over every position, pads
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
