"""The NPT objective: its options, its output and `NPTLossModule`, which combines the chosen losses over every
NPT layer with the schedule and the adaptive weighting."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hf_models.npt import NPTForCausalLM
from hf_models.npt.modeling_npt import NPTLayerRecord

from ..options import ObjectiveOptions
from .losses import (
    AttentionEncodingLoss,
    CurriculumMask,
    DecomposedTargetLoss,
    DirectMLPLoss,
    FidelityLoss,
    InformationBottleneckLoss,
    ModulationGuidanceLoss,
    OrthogonalityLoss,
    ProjectionConsistencyLoss,
    RegularizationLoss,
    StageSchedule,
    masked_mean,
)
from .teacher import TeacherCapture, TeacherLayer
from .weighting import GradNormWeighting, InverseGradNormWeighting, OriginalAdaptiveWeighting, UncertaintyWeighting


@dataclass
class LayerInputs:
    """What the losses of one NPT layer read: the student's record, the teacher's capture, the masks, and the
    quantities several losses share (`vectors`, `exact_targets`), computed once when first asked for."""

    losses: NPTLossModule
    model: NPTForCausalLM
    index: int
    record: NPTLayerRecord
    teacher: TeacherLayer
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    mask: torch.Tensor
    local: torch.Tensor  # the mask of token-local losses (after the curriculum)

    @property
    def layer(self) -> nn.Module:
        return self.model.model.layers[self.index]

    @cached_property
    def target(self) -> torch.Tensor:
        return self.losses.direct_target(self.model, self.teacher)

    @cached_property
    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(v_a, v_b)` of the first rank of the projection that reads the hidden state (the first one if none
        does) `(batch, seq, out)`, `(batch, seq, in)`."""
        projections = self.record.projections.values()
        first = next(iter(projections))
        proj = next((p for p in projections if p.modulator.in_features == self.model.config.hidden_size), first)
        v_a, v_b = proj.modulator.vectors(proj.z)
        return v_a[..., 0, :], v_b[..., 0, :]

    @cached_property
    def exact_targets(self) -> dict[str, torch.Tensor]:
        return self.losses.exact_modulation_targets(self.layer, self.record, self.teacher, self.target)


def _direct(x: LayerInputs) -> torch.Tensor:
    return x.losses.direct(x.record.mlp_output, x.target, x.local)


def _attention(x: LayerInputs) -> torch.Tensor:
    return x.losses.attention(x.vectors[0], x.teacher.attn_output, x.local)


def _fidelity(x: LayerInputs) -> torch.Tensor:
    return x.losses.fidelity(x.student_logits, x.teacher_logits, x.mask)


def _regularization(x: LayerInputs) -> torch.Tensor:
    terms = []
    for proj in x.record.projections.values():
        sq_a, sq_b = proj.modulator.squared_norms(proj.z)
        terms.append(x.losses.regularization(sq_a, sq_b, proj.modulator.in_features, proj.modulator.out_features,
                                             proj.m, x.local))
    return torch.stack(terms).sum()


def _mg(x: LayerInputs) -> torch.Tensor:
    if x.losses.options.mg_impl == "original":
        return x.losses.mg.original(x.vectors[0], x.teacher.hidden_in.float(), x.teacher.attn_output.float())
    return torch.stack([x.losses.mg(proj.m, x.exact_targets[name], x.local, proj.s)
                        for name, proj in x.record.projections.items()]).mean()


def _decomposed(x: LayerInputs) -> torch.Tensor:
    if x.losses.options.decomposed_impl == "original":
        return x.losses.decomposed.original_parts(x.record.mlp_output.float(), x.teacher.attn_output.float(),
                                              x.teacher.mlp_output.float())[0]
    with torch.no_grad():
        unmodulated = x.layer.mlp(x.record.mlp_input)
    return x.losses.decomposed(x.record.mlp_output, x.target, unmodulated, x.local)


def _ib(x: LayerInputs) -> torch.Tensor:
    if x.losses.options.ib_impl == "original":
        return x.losses.ib.original(x.vectors[0], x.teacher.attn_output.float(), x.teacher.hidden_in.float(),
                                x.losses.options.ib_beta)
    if x.losses.options.ib_impl == "vib":  # the KL of the variational code (np_variational=True) to N(0, I)
        return torch.stack([masked_mean(p.modulator.code_kl(x.record.attn_output), x.local)
                            for p in x.record.projections.values()]).mean()
    return torch.stack([x.losses.ib(p.z, x.local) for p in x.record.projections.values()]).mean()


def _projection(x: LayerInputs) -> torch.Tensor:
    if x.losses.options.projection_impl == "original":
        return x.losses.projection.original(x.vectors[1].float(), x.layer.mlp.gate_proj.weight.float(),
                                        x.teacher.attn_output.float())
    name = "gate" if "gate" in x.record.projections else next(iter(x.record.projections))
    return x.losses.projection(x.record.projections[name].m, x.exact_targets[name], x.local)


def _orthogonality(x: LayerInputs) -> torch.Tensor:
    if x.losses.options.orth_impl == "original":
        return x.losses.orthogonality.original(x.vectors[0], x.teacher.hidden_in.float())
    return x.losses.orthogonality(x.vectors[0], x.record.mlp_input, x.local, key=x.index)


# Each loss of one NPT layer (the way transformers' `loss/loss_utils.py` maps names to losses); `forward` computes
# the chosen ones in this order.
LOSS_FUNCTIONS: dict[str, Callable[[LayerInputs], torch.Tensor]] = {
    "direct": _direct,
    "attention": _attention,
    "fidelity": _fidelity,
    "regularization": _regularization,
    "mg": _mg,
    "decomposed": _decomposed,
    "ib": _ib,
    "projection": _projection,
    "orthogonality": _orthogonality,
}
LOSS_NAMES = tuple(LOSS_FUNCTIONS)
# Losses that can be negative (the original code's versions) or that must not be balanced (the regulariser) keep
# their weight.
_NEVER_BALANCED = ("regularization",)


@dataclass
class NPTLossOptions(ObjectiveOptions):
    """Options of the NPT objective (`--objective_args key=value,...`).

    `losses` is a `+`-joined subset of `direct, attention, fidelity, regularization, mg, decomposed, ib, projection,
    orthogonality` (or a JSON list); each loss's `*_impl` chooses the sound version (default), the proposal's
    original code (`original`) or the repository's (`repo`, `mse`); `weight_*` are the static weights (the schedule
    overrides the first four); `adaptive` is `none`, `invgrad`, `gradnorm`, `uncertainty` or `original`. The old
    spelling `seed` of `original` still works, with a `FutureWarning`.
    """

    objective_name: ClassVar[str] = "the NPT objective"
    DEPRECATED_VALUES: ClassVar[dict[str, dict[str, str]]] = {
        name: {"seed": "original"}
        for name in ("mg_impl", "decomposed_impl", "ib_impl", "projection_impl", "orth_impl", "curriculum", "adaptive")
    }

    losses: list[str] = field(default_factory=lambda: ["direct", "fidelity", "regularization"])
    direct_impl: Literal["nmse", "repo"] = "nmse"
    fidelity_impl: Literal["kl", "mse"] = "kl"
    reg_kind: Literal["element", "token", "delta_norm", "modulation"] = "element"
    mg_impl: Literal["exact", "original"] = "exact"
    mg_min_std: float = 0.0
    decomposed_impl: Literal["delta", "original"] = "delta"
    ib_impl: Literal["rate", "vib", "original"] = "rate"
    ib_beta: float = 0.01
    projection_impl: Literal["direction", "original"] = "direction"
    orth_impl: Literal["pca", "original"] = "pca"
    orth_components: int = 10
    orth_refresh: int = 100
    curriculum: Literal["none", "valid", "original"] = "none"
    curriculum_steps: list[int] = field(default_factory=lambda: [500, 1000])
    curriculum_quantiles: list[float] = field(default_factory=lambda: [0.3, 0.7])
    schedule: Literal["none", "repo", "smooth"] = "none"
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
    adaptive: Literal["none", "invgrad", "gradnorm", "uncertainty", "original"] = "none"
    adaptive_every: int = 10
    adaptive_beta: float = 0.9
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025

    def prepare(self) -> None:
        # "direct+mg" (the --objective_args form) or ["direct+mg"] (a command-line flag) -> ["direct", "mg"]
        parts = [self.losses] if isinstance(self.losses, str) else self.losses
        if isinstance(parts, list) and all(isinstance(part, str) for part in parts):
            self.losses = [name.strip() for part in parts for name in part.split("+") if name.strip()]

    def validate(self) -> None:
        unknown = sorted(set(self.losses) - set(LOSS_NAMES))
        if unknown or not self.losses:
            raise ValueError(f"`losses` must be a '+'-joined subset of {LOSS_NAMES}, got {self.losses!r}")
        if self.adaptive == "uncertainty":
            negative = [n for n in self.losses if self.impl_is_original(n)]
            if negative:
                raise ValueError(f"`adaptive`=uncertainty needs non-negative losses; {negative} use the original "
                                 "version")

    def impl_is_original(self, name: str) -> bool:
        """Whether loss `name` runs the original code's version (which may be negative)."""
        attr = {"mg": "mg_impl", "decomposed": "decomposed_impl", "ib": "ib_impl", "projection": "projection_impl",
                "orthogonality": "orth_impl"}.get(name)
        return attr is not None and getattr(self, attr) == "original"


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
        balanced = [n for n in options.losses if n not in _NEVER_BALANCED and not options.impl_is_original(n)]
        self.balanced = balanced
        self.invgrad = InverseGradNormWeighting(options.adaptive_every, options.adaptive_beta) \
            if options.adaptive == "invgrad" else None
        self.gradnorm = GradNormWeighting(balanced, options.gradnorm_alpha, options.gradnorm_lr, options.adaptive_every) \
            if options.adaptive == "gradnorm" else None
        self.uncertainty = UncertaintyWeighting(balanced) if options.adaptive == "uncertainty" else None
        self.original_weighting = OriginalAdaptiveWeighting(len(options.losses)) \
            if options.adaptive == "original" else None

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
        """Compute every chosen loss (`LOSS_FUNCTIONS`, mean over NPT layers), weight and sum them.

        Args:
            model: the NPT model (for the frozen MLP weights and the NP parameters).
            records: the student's `output_npt` records.
            teacher: `capture_teacher`'s result on the same batch.
            student_logits: the student's logits `(batch, seq, vocab)`.
            mask: valid tokens `(batch, seq)` (bool).
            step: the optimizer step (schedule, curriculum, adaptive weighting).
        """
        chosen = [name for name in LOSS_FUNCTIONS if name in self.options.losses]
        mask = mask.bool()
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for index, record in records.items():
            tea = teacher.layers[index]
            local = self.curriculum(tea.attn_output, mask, step) if self.curriculum is not None else mask
            inputs = LayerInputs(self, model, index, record, tea, student_logits, teacher.logits, mask, local)
            for name in chosen:
                sums[name] = sums.get(name, 0.0) + LOSS_FUNCTIONS[name](inputs) / len(records)
            with torch.no_grad():
                s = next(iter(record.projections.values())).s.float()[mask]
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
        if self.original_weighting is not None:
            # The original code takes a gradient (and crashes without autograd); its weights are always uniform.
            original_weights = (self.original_weighting.update_weights(list(losses.values())) if torch.is_grad_enabled()
                            else [1.0 / len(losses)] * len(losses))
            applied = {n: float(w) for n, w in zip(losses, original_weights)}
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
