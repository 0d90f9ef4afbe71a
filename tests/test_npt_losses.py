"""NPT losses (training/npt/): each against a hand-computed value, the original code's bugs reproduced behind their flags,
schedules, adaptive weighting and masking."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_models.npt import NPTForCausalLM
from training.npt import (
    LOSS_FUNCTIONS,
    LOSS_NAMES,
    AttentionEncodingLoss,
    CurriculumMask,
    DecomposedTargetLoss,
    DirectMLPLoss,
    FidelityLoss,
    GradNormWeighting,
    InformationBottleneckLoss,
    InverseGradNormWeighting,
    ModulationGuidanceLoss,
    NPTLossModule,
    NPTLossOptions,
    OrthogonalityLoss,
    ProjectionConsistencyLoss,
    RegularizationLoss,
    OriginalAdaptiveWeighting,
    StageSchedule,
    UncertaintyWeighting,
    capture_teacher,
)

ONE = torch.ones(1, 1, dtype=torch.bool)


def tok(*values: float) -> torch.Tensor:
    """One token: shape (1, 1, n)."""
    return torch.tensor(values).view(1, 1, -1)


def test_direct_loss_values():
    y, target = tok(1.0, 0.0), tok(0.0, 1.0)
    assert math.isclose(float(DirectMLPLoss("nmse")(y, target, ONE)), 2.0, abs_tol=1e-6)
    assert math.isclose(float(DirectMLPLoss("repo")(y, target, ONE)), 1.414212, abs_tol=1e-6)


def test_attention_encoding_values():
    assert math.isclose(float(AttentionEncodingLoss()(tok(0.0, 1.0), tok(1.0, 0.0), ONE)), 1.914212, abs_tol=1e-6)
    assert float(AttentionEncodingLoss()(tok(1.0, 0.0), tok(1.0, 0.0), ONE)) == pytest.approx(0.0, abs=1e-6)


def test_regularisation_values():
    sq_a, sq_b = torch.tensor([[[5.0]]]), torch.tensor([[[9.0]]])  # v_a = [1, 2], v_b = [0, 0, 3]
    m = tok(0.0, 0.0, 6.0)
    assert float(RegularizationLoss("element")(sq_a, sq_b, 2, 3, m, ONE)) == pytest.approx(5.5)
    assert float(RegularizationLoss("token")(sq_a, sq_b, 2, 3, m, ONE)) == pytest.approx(14.0)
    assert float(RegularizationLoss("delta_norm")(sq_a, sq_b, 2, 3, m, ONE)) == pytest.approx(3 * math.sqrt(5))
    assert float(RegularizationLoss("modulation")(sq_a, sq_b, 2, 3, m, ONE)) == pytest.approx(36.0)


def test_exact_modulation_guidance_value():
    # q = [1, 0], v_a = [2, 0] → s = 2; v_b = [1, 1, 0] → m = [2, 2, 0]; Δg* = [0, 0, 2]: ‖m - Δ‖² / ‖Δ‖² = 12 / 4
    m = tok(2.0, 2.0, 0.0)
    assert float(ModulationGuidanceLoss("exact")(m, tok(0.0, 0.0, 2.0), ONE)) == pytest.approx(3.0)
    hinge = ModulationGuidanceLoss("exact", min_std=1.0)(m, tok(0.0, 0.0, 2.0), torch.ones(1, 2, dtype=torch.bool),
                                                          torch.zeros(1, 2, 1))
    assert float(hinge) == pytest.approx(3.0 + 1.0)  # constant scalars: std 0 → hinge 1


def test_original_modulation_guidance_value_and_unboundedness():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v_a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert float(ModulationGuidanceLoss.original(v_a, h, a)) == pytest.approx(0.0725032 - 0.05, abs=1e-6)
    assert float(ModulationGuidanceLoss.original(1000 * v_a, h, a)) < -1000  # −Var(s) rewards blowing s up


def test_original_modulation_guidance_rank_k_broadcasts_seq_against_k():
    v_a = torch.randn(1, 3, 4, 8)  # (batch, seq, k, d) with k=4 != seq=3
    with pytest.raises(RuntimeError):
        ModulationGuidanceLoss.original(v_a, torch.randn(1, 3, 8), torch.randn(1, 3, 8))


def test_kl_fidelity_value_and_chunking():
    student, teacher = torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[[0.0, 0.0]]])
    assert float(FidelityLoss("kl")(student, teacher, ONE)) == pytest.approx(0.143841, abs=1e-6)
    s, t = torch.randn(2, 9, 7), torch.randn(2, 9, 7)
    mask = torch.ones(2, 9, dtype=torch.bool)
    assert float(FidelityLoss("kl", chunk_size=2)(s, t, mask)) == pytest.approx(float(FidelityLoss("kl")(s, t, mask)))


def test_original_decomposed_target_has_an_identically_zero_mlp_part():
    y, a, mlp = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    loss, attn_part, mlp_part = DecomposedTargetLoss.original_parts(y, a, mlp)
    assert torch.equal(attn_part, y) and torch.equal(mlp_part, torch.zeros_like(y))
    loss.backward()
    torch.testing.assert_close(y.grad, 0.5 * 2 * (y - a).detach() / y.numel())  # trains y ≈ a only


def test_delta_decomposition_supervises_what_the_modulation_adds():
    base, target = tok(1.0, 1.0), tok(1.0, 3.0)
    assert float(DecomposedTargetLoss()(tok(1.0, 2.0), target, base, ONE)) == pytest.approx(1.0 / 4.0)


def test_information_bottleneck_rate_is_nonnegative_and_original_is_negative():
    z = tok(3.0, 4.0)
    assert float(InformationBottleneckLoss()(z, ONE)) == pytest.approx(12.5)
    v_a, a, h = tok(1.0, 0.0), tok(1.0, 0.0), tok(0.0, 1.0)
    assert float(InformationBottleneckLoss.original(v_a, a, h)) == pytest.approx(-1.0)


def test_projection_consistency_is_sign_aware():
    target = tok(1.0, 2.0, 0.0)
    assert float(ProjectionConsistencyLoss()(-target, target, ONE)) == pytest.approx(2.0)
    assert float(ProjectionConsistencyLoss()(3 * target, target, ONE)) == pytest.approx(0.0, abs=1e-6)
    v_b = torch.randn(1, 4, 6)
    original = ProjectionConsistencyLoss.original(v_b, torch.randn(6, 5), torch.randn(1, 4, 5))
    assert float(ProjectionConsistencyLoss.original(-v_b, torch.randn(6, 5), torch.randn(1, 4, 5))) != float(original)


def test_original_orthogonality_raises_unless_width_is_ten_and_pca_version_works():
    with pytest.raises(RuntimeError):
        OrthogonalityLoss.original(torch.randn(2, 12, 16), torch.randn(2, 12, 16))
    torch.manual_seed(0)
    x = torch.randn(64, 8) * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1])
    loss = OrthogonalityLoss(components=1)
    mask = torch.ones(1, 64, dtype=torch.bool)
    along = loss(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]).expand(1, 64, 8), x[None], mask)
    across = loss(torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0]).expand(1, 64, 8), x[None], mask)
    assert float(along) > 0.9 and float(across) < 0.1


def test_orthogonality_basis_is_kept_per_layer_between_refreshes():
    torch.manual_seed(0)
    loss = OrthogonalityLoss(components=1, refresh=3)
    mask = torch.ones(1, 32, dtype=torch.bool)
    first = torch.randn(1, 32, 4) * torch.tensor([10.0, 1, 1, 1])  # principal direction e0
    second = torch.randn(1, 32, 4) * torch.tensor([1.0, 10, 1, 1])  # principal direction e1
    e0 = torch.tensor([1.0, 0, 0, 0]).expand(1, 32, 4)
    for key in (2, 5):  # two NPT layers, neither of them layer 0
        assert float(loss(e0, first, mask, key=key)) > 0.9
        assert float(loss(e0, second, mask, key=key)) > 0.9  # within the refresh period: the old basis
        assert float(loss(e0, second, mask, key=key)) > 0.9
        assert float(loss(e0, second, mask, key=key)) < 0.1  # the 4th call recomputes it from `second`


def test_curriculum_quantile_over_valid_tokens_only():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, 100.0]]).unsqueeze(-1)
    mask = torch.tensor([[True, True, True, True, False, False]])
    valid = CurriculumMask("valid", quantiles=(0.5, 0.9), steps=(10, 20))
    original = CurriculumMask("original", quantiles=(0.5, 0.9), steps=(10, 20))
    assert valid(a, mask, 0).tolist() == [[True, True, False, False, False, False]]
    assert original(a, mask, 0).tolist() == [[True, True, True, False, False, False]]  # pads move the threshold
    assert torch.equal(valid(a, mask, 25), mask)
    assert valid(a.bfloat16(), mask, 0).tolist() == [[True, True, False, False, False, False]]


def test_repo_and_smooth_stage_schedules():
    repo = StageSchedule("repo", stage1_steps=1000)
    names = ("direct", "attention", "fidelity", "regularization")
    for step, expected, stage in ((0, (0.1, 0.8, 0.1, 0.01), 1), (2000, (0.3, 0.55, 0.2, 0.01), 2),
                                  (3000, (10.0, 1.0, 1.0, 0.01), 3)):
        weights, got_stage = repo(step)
        assert tuple(round(weights[n], 6) for n in names) == expected and got_stage == stage
    assert repo(2999)[0]["direct"] == pytest.approx(0.5, abs=1e-3)  # then the 20x jump at 3S
    smooth = StageSchedule("smooth", stage1_steps=1000)
    assert smooth(2999)[0]["direct"] == pytest.approx(10.0, abs=0.01)
    assert StageSchedule("none", static={"direct": 2.0})(5000) == ({"direct": 2.0}, 1)


def test_inverse_grad_norm_balancing_value():
    theta = torch.tensor(1.0, requires_grad=True)
    losses = {"a": theta ** 2, "b": 4 * theta ** 2}
    weights = InverseGradNormWeighting(every=1)(losses, {"a": 1.0, "b": 1.0}, [theta], step=0)
    assert weights["a"] == pytest.approx(1.6) and weights["b"] == pytest.approx(0.4)
    assert weights["a"] * 2.0 == pytest.approx(3.2) and weights["b"] * 8.0 == pytest.approx(3.2)


def test_gradnorm_moves_weight_towards_the_loss_with_smaller_gradients():
    theta = torch.tensor(1.0, requires_grad=True)
    gradnorm = GradNormWeighting(["a", "b"], lr=0.05)
    for step in range(20):
        weights = gradnorm({"a": theta ** 2, "b": 4 * theta ** 2}, {"a": 1.0, "b": 1.0}, [theta], step)
    assert weights["a"] > 1.0 > weights["b"]
    assert weights["a"] + weights["b"] == pytest.approx(2.0, abs=1e-5)


def test_uncertainty_weighting_values():
    weighting = UncertaintyWeighting(["x"])
    loss = {"x": torch.tensor(2.0)}
    assert float(weighting.combine(loss, {"x": 1.0}).detach()) == pytest.approx(1.0)
    with torch.no_grad():
        weighting.log_vars.fill_(math.log(2.0))
    assert float(weighting.combine(loss, {"x": 1.0}).detach()) == pytest.approx(0.846574, abs=1e-6)
    optimizer = torch.optim.SGD([weighting.log_vars], lr=0.5)
    with torch.no_grad():
        weighting.log_vars.zero_()
    for _ in range(200):
        optimizer.zero_grad()
        weighting.combine(loss, {"x": 1.0}).backward()
        optimizer.step()
    assert float(weighting.log_vars.detach()) == pytest.approx(math.log(2.0), abs=1e-3)


def test_original_adaptive_weighting_is_always_uniform():
    theta = torch.tensor(3.0, requires_grad=True)
    weights = OriginalAdaptiveWeighting(3).update_weights([theta, 100 * theta ** 2, 1e-3 * theta])
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3))


def test_options_reject_unknown_values():
    with pytest.raises(ValueError, match="losses"):
        NPTLossOptions(losses="direct+magic")
    with pytest.raises(ValueError, match="mg_impl"):
        NPTLossOptions(mg_impl="exactish")
    with pytest.raises(ValueError, match="unknown objective argument.*the NPT objective"):
        NPTLossOptions.from_args({"lr": 1})
    with pytest.raises(ValueError, match="uncertainty"):
        NPTLossOptions(losses="direct+mg", mg_impl="original", adaptive="uncertainty")


# ------------------------------------------------------------------------------------- the loss module end to end
def tiny_npt(**fields) -> NPTForCausalLM:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"))
    return NPTForCausalLM.from_llama(llama, **fields).eval()


SOUND = "direct+attention+fidelity+regularization+mg+decomposed+ib+projection+orthogonality"


def loss_values(model, input_ids, attention_mask, options):
    module = NPTLossModule(options)
    teacher = capture_teacher(model, input_ids, attention_mask)
    out = model(input_ids, attention_mask=attention_mask, output_npt=True)
    result = module(model, out.npt, teacher, out.logits, attention_mask.bool(), step=0)
    return {name: float(value.detach()) for name, value in result.components.items()}, result


@pytest.mark.parametrize("residual", ["replace", "keep"])
def test_appending_pad_tokens_changes_no_loss(residual):
    model = tiny_npt(npt_layers=[1], np_modulation="gate_up_down", np_residual_mode=residual)
    input_ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    padded_ids = torch.cat([input_ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    options = NPTLossOptions(losses=SOUND, curriculum="valid", reg_kind="delta_norm")
    plain, _ = loss_values(model, input_ids, mask, options)
    padded, _ = loss_values(model, padded_ids, padded_mask, options)
    assert plain.keys() == set(SOUND.split("+"))
    for name, value in plain.items():
        assert padded[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_exact_targets_make_the_keep_mode_layer_exact():
    """Keep mode, gate_up: the modulation that equals Δ*_gate and Δ*_up makes MLP'(LN2(h)) = MLP(LN2(h + a))."""
    model = tiny_npt(npt_layers=[1], np_modulation="gate_up", np_residual_mode="keep")
    input_ids = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    teacher = capture_teacher(model, input_ids)
    with torch.no_grad():
        record = model(input_ids, output_npt=True).npt[1]
    target = NPTLossModule.direct_target(model, teacher.layers[1])
    targets = NPTLossModule.exact_modulation_targets(model.model.layers[1], record, teacher.layers[1], target)
    mlp = model.model.layers[1].mlp
    x = record.mlp_input
    y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x) + targets["gate"]) * (mlp.up_proj(x) + targets["up"]))
    torch.testing.assert_close(y, teacher.layers[1].mlp_output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["replace", "keep"])
def test_exact_down_target_makes_the_layer_output_the_teachers(mode):
    """gate_up_down: adding Δ*_down to the down projection of the student's intermediate gives y = τ, the direct
    target (`a + MLP(LN2(h+a))` in replace mode, where the layer output is h + y)."""
    model = tiny_npt(npt_layers=[1], np_modulation="gate_up_down", np_residual_mode=mode)
    input_ids = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    teacher = capture_teacher(model, input_ids)
    with torch.no_grad():
        record = model(input_ids, output_npt=True).npt[1]
    layer_teacher = teacher.layers[1]
    target = NPTLossModule.direct_target(model, layer_teacher)
    targets = NPTLossModule.exact_modulation_targets(model.model.layers[1], record, layer_teacher, target)
    y = model.model.layers[1].mlp.down_proj(record.projections["down"].q) + targets["down"]
    expected = layer_teacher.mlp_output + (layer_teacher.attn_output if mode == "replace" else 0)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_original_options_run_and_stage_is_reported():
    model = tiny_npt(npt_layers=[1])
    input_ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    options = NPTLossOptions(losses="direct+attention+fidelity+regularization+mg+decomposed+ib+projection",
                             mg_impl="original", decomposed_impl="original", ib_impl="original", projection_impl="original",
                             direct_impl="repo", fidelity_impl="mse", schedule="repo", adaptive="original")
    values, result = loss_values(model, input_ids, torch.ones_like(input_ids), options)
    assert values["ib"] < 0
    assert all(w == pytest.approx(1 / 8) for w in result.weights.values())  # the original code's uniform weights
    assert result.metrics["stage"] == 1.0


@pytest.mark.parametrize("name,impl", [(name, {}) for name in LOSS_NAMES] + [
    ("direct", {"direct_impl": "repo"}), ("fidelity", {"fidelity_impl": "mse"}), ("mg", {"mg_impl": "original"}),
    ("decomposed", {"decomposed_impl": "original"}), ("ib", {"ib_impl": "original"}),
    ("projection", {"projection_impl": "original"}),
])
def test_every_loss_of_the_table_is_reachable_alone(name, impl):
    assert LOSS_NAMES == tuple(LOSS_FUNCTIONS)
    model = tiny_npt(npt_layers=[0, 1], np_modulation="gate_up_down")
    input_ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    values, result = loss_values(model, input_ids, torch.ones_like(input_ids), NPTLossOptions(losses=name, **impl))
    assert list(values) == [name] and math.isfinite(values[name])
    assert result.total.requires_grad


def test_unknown_loss_name_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"`losses` must be a '\+'-joined subset of .*'magic'"):
        NPTLossOptions.from_args({"losses": "direct+magic"})
    with pytest.raises(ValueError, match="`losses`"):
        NPTLossOptions(losses="")


@pytest.mark.parametrize("name", ["mg_impl", "decomposed_impl", "ib_impl", "projection_impl", "orth_impl", "curriculum",
                                  "adaptive"])
def test_old_seed_spelling_maps_to_original_with_a_future_warning(name):
    with pytest.warns(FutureWarning, match=f"{name}=seed is deprecated.*{name}=original"):
        options = NPTLossOptions.from_args({name: "seed"})
    assert getattr(options, name) == "original"
    assert NPTLossModule(options).options == NPTLossOptions(**{name: "original"})


def test_old_class_name_keeps_working_with_a_future_warning():
    import training.npt
    import training.npt.weighting

    for module in (training.npt, training.npt.weighting):
        with pytest.warns(FutureWarning, match="SeedAdaptiveWeighting is deprecated"):
            assert module.SeedAdaptiveWeighting is OriginalAdaptiveWeighting


# ------------------------------------------------------------------------------------- the information bottleneck
def _rescaled(model: NPTForCausalLM, c: float) -> NPTForCausalLM:
    """The same function with `W_down` times c and `W_A`, `W_B` over c (the modulation is bilinear in z)."""
    clone = NPTForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in clone.npt_layers.values():
            for modulator in layer.np_component.values():
                modulator.down.weight.mul_(c)
                modulator.a_up.weight.div_(c)
                modulator.b_up.weight.div_(c)
    return clone.train(model.training)


def _ib_loss_and_modulation(model, input_ids, options, noise_seed=0):
    teacher = capture_teacher(model, input_ids, torch.ones_like(input_ids))
    torch.manual_seed(noise_seed)
    out = model(input_ids, output_npt=True)
    result = NPTLossModule(options)(model, out.npt, teacher, out.logits, torch.ones_like(input_ids).bool(), step=0)
    modulation = torch.cat([p.m for record in out.npt.values() for p in record.projections.values()])
    return result.components["ib"], modulation


def test_the_rate_bottleneck_is_lowered_for_free_by_a_rescaling():
    """Why `vib` exists: the noise-free rate ½‖z‖² shrinks by c² under a rescaling that changes no output."""
    model = tiny_npt(npt_layers=[1], np_rank=4)
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    options = NPTLossOptions(losses="direct+ib", ib_impl="rate")
    loss, modulation = _ib_loss_and_modulation(model, input_ids, options)
    loss_small, modulation_small = _ib_loss_and_modulation(_rescaled(model, 0.1), input_ids, options)
    torch.testing.assert_close(modulation_small, modulation, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_small, 0.01 * loss, rtol=1e-4, atol=1e-8)


def test_the_variational_bottleneck_charges_for_a_rescaling():
    model = tiny_npt(npt_layers=[1], np_rank=4, np_variational=True).train()
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    options = NPTLossOptions(losses="direct+ib", ib_impl="vib")
    loss, modulation = _ib_loss_and_modulation(model, input_ids, options)
    loss_small, modulation_small = _ib_loss_and_modulation(_rescaled(model, 0.1), input_ids, options)
    # the KL's mean term shrinks, but the noise (sigma is not rescaled) now swamps the code: the modulation changes
    assert loss_small < loss
    relative = (modulation_small - modulation).norm() / modulation.norm()
    assert relative > 0.5, relative
    # evaluation decodes from the mean: then the rescaled model is the same function
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_rescaled(model, 0.1)(input_ids).logits, model(input_ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_the_variational_code_kl_against_a_hand_value():
    model = tiny_npt(npt_layers=[1], np_rank=2, np_variational=True)
    modulator = next(iter(model.npt_layers[1].np_component.values()))
    with torch.no_grad():
        modulator.down.weight.zero_()
        modulator.down.weight[0, 0] = 2.0  # mu = (2 a_0, 0)
        modulator.log_sigma.copy_(torch.tensor([0.0, math.log(0.5)]))
    attn_output = torch.zeros(1, 1, 32)
    attn_output[0, 0, 0] = 1.5  # mu = (3, 0)
    expected = 0.5 * ((9 + 1 - 1 - 0) + (0 + 0.25 - 1 - 2 * math.log(0.5)))
    assert modulator.code_kl(attn_output).item() == pytest.approx(expected, rel=1e-6)
    assert float(modulator.log_sigma.exp()[1]) == pytest.approx(0.5)


def test_vib_needs_a_variational_model():
    from transformers import TrainingArguments

    from training.npt import NPTTrainer

    with pytest.raises(ValueError, match="np_variational=True"):
        NPTTrainer(model=tiny_npt(npt_layers=[1]), args=TrainingArguments(output_dir="unused", use_cpu=True),
                   loss_module=NPTLossModule(NPTLossOptions(losses="direct+ib", ib_impl="vib")))


# ------------------------------------------------------------------------ the ablation's summary and card section
def _run(name: str, seed: int, kl: float, top1: float, ppl_npt: float, ppl_drop: float, mode: str = "replace",
         ppl_base: float = 19.6) -> dict:
    fields = {} if mode == "replace" else {"np_residual_mode": mode}
    return {"name": name, "seed": seed, "layers": [2], "npt_fields": fields,
            "after": {"kl": kl, "top1": top1, "ppl_base": ppl_base, "ppl_npt": ppl_npt, "ppl_drop": ppl_drop,
                      "recovery": (ppl_drop - ppl_npt) / (ppl_drop - ppl_base)}}


def _synthetic_results() -> list[dict]:
    # replace mode: denominator 1.2; keep mode: denominator 0.1, where a tiny PPL gain is a large R
    return [_run("base", 0, 0.024, 0.85, 20.3, 20.8), _run("base", 1, 0.026, 0.84, 20.4, 20.8),
            _run("adaptive_invgrad", 0, 0.020, 0.87, 20.2, 20.8), _run("adaptive_invgrad", 1, 0.022, 0.86, 20.2, 20.8),
            _run("fixed_invgrad", 0, 0.030, 0.83, 20.5, 20.8), _run("fixed_invgrad", 1, 0.031, 0.83, 20.5, 20.8),
            _run("residual_keep", 0, 0.0012, 0.97, 19.61, 19.7, "keep"),
            _run("residual_keep", 1, 0.0014, 0.96, 19.64, 19.7, "keep"),
            _run("keep_bad", 0, 0.0030, 0.95, 19.68, 19.7, "keep"),
            {"name": "failed", "seed": 0, "layers": [2], "npt_fields": {}, "error": "RuntimeError: x"}]


def test_summary_reports_r_with_its_denominator_and_se_and_ranks_r_only_within_a_mode():
    from benchmarks.npt_losses import summarize

    rows = {row["config"]: row for row in summarize(_synthetic_results())}
    assert set(rows) == {"base", "adaptive_invgrad", "fixed_invgrad", "residual_keep", "keep_bad"}  # failed: none
    base, keep = rows["base"], rows["residual_keep"]
    assert (base["mode"], keep["mode"], base["seeds"], rows["keep_bad"]["seeds"]) == ("replace", "keep", 2, 1)
    assert base["denominator_mean"] == pytest.approx(1.2) and keep["denominator_mean"] == pytest.approx(0.1)
    r0, r1 = (20.8 - 20.3) / 1.2, (20.8 - 20.4) / 1.2
    assert base["R_mean"] == pytest.approx((r0 + r1) / 2)
    assert base["R_se"] == pytest.approx(abs(r0 - r1) / 2)  # two values: SE = |a − b| / 2
    assert base["kl_se"] == pytest.approx(0.001) and rows["keep_bad"]["kl_se"] == 0.0
    # KL and top-1 rank across the modes: both keep-mode rows first
    assert [rows[n]["kl_rank"] for n in ("residual_keep", "keep_bad", "adaptive_invgrad", "base", "fixed_invgrad")] \
        == [1, 2, 3, 4, 5]
    assert [rows[n]["top1_rank"] for n in ("residual_keep", "keep_bad", "adaptive_invgrad", "base")] == [1, 2, 3, 4]
    # R ranks within its own mode: keep-mode R (≈0.75) exceeds every replace R but does not outrank them
    assert keep["R_mean"] > rows["adaptive_invgrad"]["R_mean"]
    assert (keep["r_rank"], rows["keep_bad"]["r_rank"]) == (1, 2)
    assert [rows[n]["r_rank"] for n in ("adaptive_invgrad", "base", "fixed_invgrad")] == [1, 2, 3]


def test_r_ranks_only_among_rows_replacing_the_same_layers():
    from benchmarks.npt_losses import summarize

    # replacing three layers has a denominator of ~8 PPL: its R is not comparable with the one-layer rows' R
    three = dict(_run("base", 0, 0.09, 0.71, 22.5, 27.8), layers=[1, 2, 3])
    rows = {(row["config"], row["layers"]): row for row in summarize(_synthetic_results() + [three])}
    assert rows[("base", "1,2,3")]["R_mean"] > rows[("adaptive_invgrad", "2")]["R_mean"]
    assert rows[("base", "1,2,3")]["r_rank"] == 1 and rows[("adaptive_invgrad", "2")]["r_rank"] == 1


def test_control_verdict_compares_kl_with_the_adaptive_run_within_2_se():
    from benchmarks.npt_losses import control_verdicts, summarize

    (verdict,) = control_verdicts(summarize(_synthetic_results()))
    assert (verdict["control"], verdict["adaptive"], verdict["seeds"]) == ("fixed_invgrad", "adaptive_invgrad", 2)
    assert verdict["delta_kl"] == pytest.approx(0.0305 - 0.021)
    assert verdict["se"] == pytest.approx(math.hypot(0.0005, 0.001))
    assert verdict["beyond_2se"] is True
    close = [_run("adaptive_invgrad", 0, 0.020, 0.87, 20.2, 20.8), _run("adaptive_invgrad", 1, 0.030, 0.86, 20.2, 20.8),
             _run("fixed_invgrad", 0, 0.026, 0.83, 20.5, 20.8), _run("fixed_invgrad", 1, 0.027, 0.83, 20.5, 20.8)]
    assert control_verdicts(summarize(close))[0]["beyond_2se"] is False


def test_converged_weights_are_the_mean_of_the_last_logged_steps_as_option_fields():
    from benchmarks.npt_losses import converged_weights

    log = [{"loss": 1.0, "loss_weight_direct": value, "loss_weight_fidelity": 2.0 - value} for value in
           (1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5)]
    weights = converged_weights(log, last=5)
    assert weights == pytest.approx({"weight_direct": 0.3, "weight_fidelity": 1.7})
    assert NPTLossOptions.from_args(weights).weight_direct == pytest.approx(0.3)  # the fields the control sets


def test_the_cards_npt_losses_section_is_generated_from_its_committed_json():
    """`python -m benchmarks.npt_losses card <results.json>` wrote the card's section: no hand-typed figure."""
    import json
    from pathlib import Path

    from benchmarks.npt_losses import CARD, card_block

    root = Path(__file__).resolve().parents[1]
    reports = sorted((root / "model_cards" / "results" / "npt_losses").glob("*/results.json"))
    assert reports, "no committed npt_losses results"
    for path in reports:
        block = card_block(json.loads(path.read_text()), path.relative_to(root).as_posix())
        assert block in CARD.read_text(), f"regenerate with: python -m benchmarks.npt_losses card {path.relative_to(root)}"
