"""Layer-wise distillation of NPT layers from their own base Llama: teacher capture, the losses (the
original repository's, the seven proposals in their original code, and the sound versions), stage schedules, adaptive
loss weighting, evaluation, and the `NPTTrainer` that `python -m training.train --model_type npt_llama` runs.
Sub-modules: `losses` (each loss, the curriculum, the stage schedule), `weighting` (adaptive weighting), `teacher`
(capture), `objective` (options, the table of losses `LOSS_FUNCTIONS` and `NPTLossModule`), `evaluation`,
`trainer`; every public name is importable from `training.npt`.

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
                anti-collapse hinge relu(mg_min_std - std_M(s)). `original`: MSE(σ(s), σ(‖a‖/‖h‖)) - 0.1 Var(s).
* decomposed    `delta`: NMSE(y - MLP(x), τ - MLP(x)) (supervise what the modulation must add). `original`: the
                original code's slice `y[..., :d]`, which is all of y, so its "MLP part" is identically zero.
* ib            `rate`: ½ mean ‖z‖² (the rate term of a fixed-variance Gaussian code, KL(N(z, I) ‖ N(0, I)),
                non-negative). `original`: β|cos(v_a, h)| - |cos(v_a, a)| (negative, not a mutual information).
* projection    `direction`: 1 - mean cos(m_gate, Δ*_gate) (sign-aware, through the RMSNorm). `original`: the
                original code's consistency + alignment with W_g a.
* orthogonality `pca`: mean ‖normalize(v_a) V_q‖² with V_q the top principal directions of the centred MLP input,
                detached and refreshed every `orth_refresh` steps. `original`: `v_a @ V.T` (a shape error unless d = q).
Curriculum (`valid` / `original`) masks tokens whose ‖a‖ is above the 30 % / 70 % quantile for the first steps; it
applies to token-local losses only (not to fidelity). Schedules: `none` (static `weight_*`), `repo` (the
repository's three stages, with its jump at 3S) and `smooth` (stage 2 ramps to the stage-3 weights). Adaptive
weighting: `invgrad` (inverse gradient-norm balancing on the NP parameters), `gradnorm` (Chen et al. 2018),
`uncertainty` (Kendall et al. 2018) and `original` (the original code's version, whose weights are always uniform).
`original` (the proposals' code as first written) was spelled `seed` before; the old spelling still works, with a
`FutureWarning`, and so does the old class name `SeedAdaptiveWeighting`.
"""

from typing import Any

from . import weighting as _weighting
from .evaluation import evaluate_npt
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
from .objective import LOSS_FUNCTIONS, LOSS_NAMES, LayerInputs, NPTLossModule, NPTLossOptions, NPTLossOutput
from .teacher import TeacherCapture, TeacherLayer, capture_teacher
from .trainer import LOSS_WEIGHTING_FILE, NPTTrainer, freeze_base
from .weighting import GradNormWeighting, InverseGradNormWeighting, OriginalAdaptiveWeighting, UncertaintyWeighting


def __getattr__(name: str) -> Any:
    if name in _weighting.DEPRECATED_NAMES:  # old names keep working, with a FutureWarning
        return getattr(_weighting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LOSS_FUNCTIONS",
    "LOSS_NAMES",
    "LOSS_WEIGHTING_FILE",
    "AttentionEncodingLoss",
    "CurriculumMask",
    "DecomposedTargetLoss",
    "DirectMLPLoss",
    "FidelityLoss",
    "GradNormWeighting",
    "InformationBottleneckLoss",
    "InverseGradNormWeighting",
    "LayerInputs",
    "ModulationGuidanceLoss",
    "NPTLossModule",
    "NPTLossOptions",
    "NPTLossOutput",
    "NPTTrainer",
    "OriginalAdaptiveWeighting",
    "OrthogonalityLoss",
    "ProjectionConsistencyLoss",
    "RegularizationLoss",
    "StageSchedule",
    "TeacherCapture",
    "TeacherLayer",
    "UncertaintyWeighting",
    "capture_teacher",
    "evaluate_npt",
    "freeze_base",
    "masked_mean",
]
