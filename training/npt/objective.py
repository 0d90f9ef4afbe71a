"""The NPT objective: its options, its output and `NPTLossModule`, which combines the chosen losses over every
NPT layer with the schedule and the adaptive weighting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
)
from .teacher import TeacherCapture, TeacherLayer
from .weighting import GradNormWeighting, InverseGradNormWeighting, SeedAdaptiveWeighting, UncertaintyWeighting


LOSS_NAMES = ("direct", "attention", "fidelity", "regularization", "mg", "decomposed", "ib", "projection",
              "orthogonality")
# Losses that can be negative (the seed's versions) or that must not be balanced (the regulariser) keep their weight.
_NEVER_BALANCED = ("regularization",)


@dataclass
class NPTLossOptions(ObjectiveOptions):
    """Options of the NPT objective (`--objective_args key=value,...`).

    `losses` is a `+`-joined subset of `direct, attention, fidelity, regularization, mg, decomposed, ib, projection,
    orthogonality` (or a JSON list); each loss's `*_impl` chooses the sound version (default) or the seed's
    (`seed`) / the repository's (`repo`, `mse`); `weight_*` are the static weights (the schedule overrides the
    first four); `adaptive` is `none`, `invgrad`, `gradnorm`, `uncertainty` or `seed`.
    """

    objective_name: ClassVar[str] = "the NPT objective"

    losses: list[str] = field(default_factory=lambda: ["direct", "fidelity", "regularization"])
    direct_impl: Literal["nmse", "repo"] = "nmse"
    fidelity_impl: Literal["kl", "mse"] = "kl"
    reg_kind: Literal["element", "token", "delta_norm", "modulation"] = "element"
    mg_impl: Literal["exact", "seed"] = "exact"
    mg_min_std: float = 0.0
    decomposed_impl: Literal["delta", "seed"] = "delta"
    ib_impl: Literal["rate", "seed"] = "rate"
    ib_beta: float = 0.01
    projection_impl: Literal["direction", "seed"] = "direction"
    orth_impl: Literal["pca", "seed"] = "pca"
    orth_components: int = 10
    orth_refresh: int = 100
    curriculum: Literal["none", "valid", "seed"] = "none"
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
    adaptive: Literal["none", "invgrad", "gradnorm", "uncertainty", "seed"] = "none"
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
            seedy = [n for n in self.losses if self.impl_is_seed(n)]
            if seedy:
                raise ValueError(f"`adaptive`=uncertainty needs non-negative losses; {seedy} use the seed version")

    def impl_is_seed(self, name: str) -> bool:
        """Whether loss `name` runs the seed's version (which may be negative)."""
        attr = {"mg": "mg_impl", "decomposed": "decomposed_impl", "ib": "ib_impl", "projection": "projection_impl",
                "orthogonality": "orth_impl"}.get(name)
        return attr is not None and getattr(self, attr) == "seed"


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
