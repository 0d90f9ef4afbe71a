"""NPT (seed 004): equivalences with the base Llama, the fused modulation, folding, generation, save/load,
teacher capture, gradient isolation and bad input, on a tiny random Llama (d=64, f=176, 4 layers, fp32, eager)."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

import hf_models
from hf_models.npt import NPModulator, NPTConfig, NPTForCausalLM, load_npt_or_convert_llama, resolve_npt_layers
from training.npt import LOSS_WEIGHTING_FILE, NPTLossModule, NPTLossOptions, NPTTrainer, capture_teacher

from .conftest import assert_same_generation

VOCAB = 256


def base_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")
    config = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(config).eval()


def npt_from(llama: LlamaForCausalLM, seed: int = 1, **fields) -> NPTForCausalLM:
    torch.manual_seed(seed)
    return NPTForCausalLM.from_llama(llama, **fields).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine two intra-op threads wait on each other (a 20-token
    generate went from 0.05 s to 6 s); one thread keeps the module fast. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(one_thread) -> LlamaForCausalLM:
    return base_llama()


# ------------------------------------------------------------------------------------------------ config
def test_layer_selection_helpers():
    assert resolve_npt_layers(None, 4) == [2, 3]
    assert resolve_npt_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_npt_layers("1:3", 4) == [1, 2]
    assert resolve_npt_layers([-1, 1, 1], 4) == [1, 3]
    assert NPTConfig(num_hidden_layers=4, npt_layers="upper_half").npt_layers == [2, 3]


@pytest.mark.parametrize("fields,name", [
    ({"npt_layers": [4]}, "npt_layers"), ({"npt_layers": [-5]}, "npt_layers"), ({"np_rank": 0}, "np_rank"),
    ({"np_num_ranks": 0}, "np_num_ranks"), ({"np_modulation": "up"}, "np_modulation"),
    ({"np_generator": "mlp", "np_generator_act": "softmax"}, "np_generator_act"),
])
def test_bad_npt_fields_raise_before_any_work(llama, fields, name):
    with pytest.raises(ValueError, match=name):
        NPTForCausalLM.from_llama(llama, **fields)


def test_converting_a_non_llama_checkpoint_fails_on_its_config(tmp_path):
    spec = hf_models.get_spec("toeplitz_mixer")
    spec.model_class(spec.make_config(tiny=True)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="Llama checkpoints only"):
        NPTForCausalLM.from_llama(tmp_path / "other", npt_layers=[0])
    with pytest.raises(ValueError, match="Llama checkpoints only"):
        load_npt_or_convert_llama(str(tmp_path / "other"), {}, False)
    with pytest.raises(ValueError, match="plain LlamaForCausalLM"):
        NPTForCausalLM.from_llama(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("fields", [
    {"npt_layers": [2]},
    {"npt_layers": "all", "np_modulation": "gate_up_down", "np_num_ranks": 3, "np_shared_bottleneck": True},
    {"npt_layers": [1, 3], "np_generator": "affine", "np_residual_mode": "keep"},
])
def test_npt_disabled_is_the_base_llama_exactly(llama, fields):
    model = npt_from(llama, **fields)
    input_ids = ids()
    with torch.no_grad():
        expected = llama(input_ids).logits
        npt_logits = model(input_ids).logits
        with model.npt_disabled():
            disabled = model(input_ids).logits
        partly = model.npt_disabled(layers=[model.config.npt_layers[0]])
        with partly:
            assert not model.npt_layers[model.config.npt_layers[0]].npt_enabled
    assert torch.equal(disabled, expected)
    assert not torch.allclose(npt_logits, expected)
    assert all(layer.npt_active for layer in model.npt_layers.values())


def test_zero_b_keep_superset_mode_is_the_base_llama_exactly(llama):
    model = npt_from(llama, npt_layers="all", np_init="zero_b", np_residual_mode="keep", np_mlp_input="h_plus_attn",
                     np_modulation="gate_up_down", np_num_ranks=2)
    input_ids = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, llama(input_ids).logits)


@pytest.mark.parametrize("mode", ["replace", "keep"])
def test_zero_modulation_with_the_original_mlp_input_is_not_llama(llama, mode):
    """With v_b = 0 and the MLP fed LN2(h): replace gives h + MLP(LN2(h)), keep gives h + a + MLP(LN2(h)); neither
    is the base layer (the MLP misses the attention output)."""
    model = npt_from(llama, npt_layers=[2], np_init="zero_b", np_residual_mode=mode)
    layer = model.model.layers[2]
    with torch.no_grad():
        teacher = capture_teacher(model, ids())
        tea = teacher.layers[2]
        h = tea.hidden_in
        expected = h + layer.mlp(layer.post_attention_layernorm(h))
        if mode == "keep":
            expected = h + tea.attn_output + layer.mlp(layer.post_attention_layernorm(h))
        record = model(ids(), output_npt=True).npt[2]
    torch.testing.assert_close(record.hidden_out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(record.hidden_out, tea.hidden_out, atol=1e-6)


# ------------------------------------------------------------------------------------------ fused modulation
def naive_modulated(modulator: NPModulator, a: torch.Tensor, q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per token: build ΔW_t = Σ_j v_b_j v_a_jᵀ explicitly and apply (W + ΔW_t) q_t."""
    z = modulator.bottleneck(a)
    v_a, v_b = modulator.vectors(z)
    out = torch.empty(*q.shape[:-1], weight.shape[0])
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            delta = sum(torch.outer(v_b[b, t, j], v_a[b, t, j]) for j in range(modulator.num_ranks))
            out[b, t] = (weight + delta) @ q[b, t]
    return out


@pytest.mark.parametrize("n_in,n_out", [(64, 176), (176, 64)])
@pytest.mark.parametrize("k,shared,generator", [(1, False, "linear"), (3, False, "linear"), (3, True, "linear"),
                                                (3, False, "affine"), (2, False, "mlp")])
def test_fused_modulation_equals_explicit_per_token_updates(n_in, n_out, k, shared, generator):
    torch.manual_seed(0)
    modulator = NPModulator(64, n_in, n_out, rank=8, num_ranks=k, generator=generator, shared_bottleneck=shared)
    modulator.init_np_weights("improved", 0.3)
    if generator == "affine":
        torch.nn.init.normal_(modulator.a_bias)
        torch.nn.init.normal_(modulator.b_bias)
    weight = torch.randn(n_out, n_in)
    a, q = torch.randn(2, 5, 64), torch.randn(2, 5, n_in)
    m, s, z = modulator(a, q)
    torch.testing.assert_close(q @ weight.T + m, naive_modulated(modulator, a, q, weight), rtol=1e-5, atol=1e-5)
    v_a, v_b = modulator.vectors(z)
    torch.testing.assert_close(s, (v_a * q.unsqueeze(-2)).sum(-1), rtol=1e-5, atol=1e-5)
    sq_a, sq_b = modulator.squared_norms(z)
    torch.testing.assert_close(sq_a, v_a.pow(2).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq_b, v_b.pow(2).sum(-1), rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {arg.untyped_storage().data_ptr() for arg in args if isinstance(arg, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:  # not a view
                self.largest = max(self.largest, tensor.numel())
        return out


def test_forward_never_materialises_per_token_weight_matrices(llama):
    model = npt_from(llama, npt_layers="all", np_modulation="gate_up_down", np_num_ranks=3)
    input_ids = ids(2, 16)
    with torch.no_grad(), _LargestTensor() as spy:
        model(input_ids)
    per_token_matrices = 2 * 16 * 64 * 176  # one (n_out x n_in) update per token
    v_b_tensors = 2 * 16 * 3 * 176  # (batch, seq, k, f): v_b is never built either
    assert spy.largest < min(per_token_matrices, v_b_tensors), spy.largest


def test_linear_generator_is_even_in_the_attention_output_affine_is_not():
    torch.manual_seed(0)
    a, q = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    linear = NPModulator(64, 64, 176, rank=8, num_ranks=2)
    linear.init_np_weights("improved", 0.1)
    assert torch.equal(linear(a, q)[0], linear(-a, q)[0])
    affine = NPModulator(64, 64, 176, rank=8, num_ranks=2, generator="affine")
    affine.init_np_weights("improved", 0.1)
    torch.nn.init.normal_(affine.a_bias)
    torch.nn.init.normal_(affine.b_bias)
    assert not torch.allclose(affine(a, q)[0], affine(-a, q)[0])


def test_np_alpha_and_enabled_layers_are_runtime_controls(llama):
    model = npt_from(llama, npt_layers=[2, 3])
    input_ids = ids()
    with torch.no_grad():
        full = model(input_ids, output_npt=True)
        with model.npt_alpha(0.0):
            off = model(input_ids, output_npt=True)
        model.config.npt_enabled_layers = [3]
        only_top = model(input_ids, output_npt=True)
        model.config.npt_enabled_layers = None
    assert set(full.npt) == {2, 3} and set(only_top.npt) == {3}
    assert torch.equal(off.npt[2].projections["gate"].m, torch.zeros_like(off.npt[2].projections["gate"].m))
    layer = model.model.layers[2]
    h = off.npt[2].hidden_in
    torch.testing.assert_close(off.npt[2].hidden_out, h + layer.mlp(layer.post_attention_layernorm(h)))


def test_pca_init_makes_v_a_the_projection_of_a(llama):
    model = npt_from(llama, npt_layers=[2], np_rank=64, np_init="pca")
    input_ids = ids(4, 16)
    model.initialize_np_from_pca(input_ids)
    with torch.no_grad():
        record = model(input_ids, output_npt=True).npt[2]
    proj = record.projections["gate"]
    v_a = proj.modulator.vectors(proj.z)[0][..., 0, :]
    torch.testing.assert_close(v_a, record.attn_output, rtol=1e-4, atol=1e-5)  # r = d: the full projection


# ------------------------------------------------------------------------------------------------- folding
def test_fold_worked_example():
    entry = {"q": torch.tensor([3.0, 4.0]), "m": torch.tensor([1.0, 2.0, 0.0]),
             "v_a": torch.tensor([[1.0, 0.0]]), "v_b": torch.tensor([[1 / 3, 2 / 3, 0.0]])}
    minnorm = NPTForCausalLM.fold_delta(entry, mode="minnorm")
    raw = NPTForCausalLM.fold_delta(entry, mode="raw")
    assert math.isclose(float(minnorm.norm()), 0.447214, abs_tol=1e-6)
    assert math.isclose(float(raw.norm()), 0.745356, abs_tol=1e-6)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    for mode in ("raw", "minnorm", "covariance"):
        delta = NPTForCausalLM.fold_delta(entry, alpha=2.0, mode=mode, covariance=cov)
        torch.testing.assert_close(delta @ entry["q"], 2.0 * entry["m"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="covariance"):
        NPTForCausalLM.fold_delta(entry, mode="covariance")


@pytest.mark.parametrize("mode", ["raw", "minnorm", "covariance"])
def test_folded_update_reproduces_the_modulation_on_the_same_input(llama, mode):
    """NPT layer = the last layer (nothing attends to its output): fold the modulation of the last token, switch the
    modulation off (alpha 0), and the last token's logits are those of the unfolded NPT model."""
    model = npt_from(llama, npt_layers=[3], np_modulation="gate_up_down", np_num_ranks=2)
    input_ids = ids(1, 10)
    with torch.no_grad():
        expected = model(input_ids).logits[0, -1]
    record = model.extract_modulation(input_ids, position=-1)
    covariances = model.mlp_input_covariance(ids(4, 16, seed=9)) if mode == "covariance" else None
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    edits = model.fold_modulation(record, alpha=1.0, mode=mode, covariances=covariances)
    assert [edit["projection"] for edit in edits] == ["gate", "up", "down"] and model.npt_edit_log == edits
    with torch.no_grad(), model.npt_alpha(0.0):
        folded = model(input_ids).logits[0, -1]
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    model.revert_edits()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert model.npt_edit_log == []


def test_save_as_llama_with_folded_weights_loads_as_plain_llama(llama, tmp_path):
    original = {name: tensor.clone() for name, tensor in llama.state_dict().items()}
    model = npt_from(llama, npt_layers=[3], np_residual_mode="keep", np_mlp_input="h_plus_attn")
    with torch.no_grad():  # a modulation far above float noise (at initialisation it is tiny)
        for _, parameter in model.np_parameters():
            parameter.mul_(10.0)
    input_ids = ids(1, 10)
    with torch.no_grad():
        expected_last = model(input_ids).logits[0, -1]
        base_logits = llama(input_ids).logits
    model.fold_modulation(model.extract_modulation(input_ids), mode="minnorm")
    model.save_as_llama(tmp_path / "folded")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "folded").eval()
    assert type(plain) is LlamaForCausalLM
    with torch.no_grad(), model.npt_disabled():
        disabled = model(input_ids).logits
        loaded = plain(input_ids).logits
    torch.testing.assert_close(loaded, disabled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded[0, -1], expected_last, rtol=1e-5, atol=1e-5)
    assert (loaded - base_logits).abs().max() > 1e-3  # the fold changed the base weights of the NPT model...
    assert all(torch.equal(llama.state_dict()[name], tensor) for name, tensor in original.items())  # ...not llama's


def test_to_llama_copies_the_base(llama):
    model = npt_from(llama, npt_layers=[1, 2])
    plain = model.to_llama().eval()
    assert type(plain) is LlamaForCausalLM and not any("np_component" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.equal(plain(ids()).logits, llama(ids()).logits)


# ---------------------------------------------------------------------------------------------- generation
def test_cached_generation_equals_uncached_with_every_option(llama):
    model = npt_from(llama, npt_layers=[1, 3], np_modulation="gate_up_down", np_num_ranks=2, np_generator="affine")
    input_ids = ids(2, 6)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert_same_generation(cached, uncached)
    short = {**kwargs, "max_new_tokens": 4}
    with model.npt_alpha(3.0):
        stronger = model.generate(input_ids, use_cache=True, **short)
    assert not torch.allclose(stronger.scores[0], cached.scores[0])
    with model.npt_disabled():
        base = model.generate(input_ids, use_cache=True, **short)
    reference = llama.generate(input_ids, use_cache=True, **short)
    assert torch.equal(base.sequences, reference.sequences)


# ------------------------------------------------------------------------------------------------ save/load
def test_save_load_is_bit_identical_including_np_weights(llama, tmp_path):
    model = npt_from(llama, npt_layers=[2], np_modulation="gate_up", np_generator="affine")
    with torch.no_grad():
        for _, parameter in model.np_parameters():
            parameter.add_(torch.randn_like(parameter))  # not what any init would produce
    model.save_pretrained(tmp_path / "npt")
    assert (tmp_path / "npt" / "configuration_npt.py").exists() and (tmp_path / "npt" / "modeling_npt.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "npt").eval()
    assert type(loaded) is NPTForCausalLM and loaded.config.npt_layers == [2]
    saved = model.state_dict()
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in saved.items())


def test_adapter_round_trip_and_base_check(llama, tmp_path):
    model = npt_from(llama, npt_layers=[1, 2], np_modulation="gate_up", np_num_ranks=2)
    with torch.no_grad():
        for _, parameter in model.np_parameters():
            parameter.add_(torch.randn_like(parameter))
        expected = model(ids()).logits
    model.save_npt_adapter(tmp_path / "adapter")
    files = sorted(path.name for path in (tmp_path / "adapter").iterdir())
    assert files == ["npt_adapter.safetensors", "npt_adapter_config.json"]
    again = NPTForCausalLM.from_llama_and_adapter(llama, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, expected)
    other = npt_from(base_llama(intermediate_size=128), npt_layers=[1, 2], np_modulation="gate_up", np_num_ranks=2)
    with pytest.raises(ValueError, match="another base architecture"):
        other.load_npt_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="do not match"):
        npt_from(llama, npt_layers=[1]).load_npt_adapter(tmp_path / "adapter")


def test_registry_loader_converts_a_saved_llama(llama, tmp_path):
    llama.save_pretrained(tmp_path / "base")
    model = load_npt_or_convert_llama(str(tmp_path / "base"), {"npt_layers": [2], "np_rank": 4}, False)
    assert isinstance(model, NPTForCausalLM) and list(model.npt_layers) == [2]
    assert model.model.layers[2].np_component["gate"].rank == 4
    model.eval()
    with torch.no_grad(), model.npt_disabled():  # the folder loads with the default (SDPA) attention kernel
        torch.testing.assert_close(model(ids()).logits, llama(ids()).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "npt")
    again = load_npt_or_convert_llama(str(tmp_path / "npt"), {"np_alpha": 0.5}, False)
    assert again.config.np_alpha == 0.5


# -------------------------------------------------------------------------------------------- teacher capture
def test_teacher_capture_equals_a_plain_base_forward(llama):
    model = npt_from(llama, npt_layers=[1, 2])
    input_ids = ids()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    teacher = capture_teacher(model, input_ids, attention_mask)
    with torch.no_grad():
        base = llama(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert torch.equal(teacher.logits, base.logits)
    for index in (1, 2):
        layer = teacher.layers[index]
        assert torch.equal(layer.hidden_in, base.hidden_states[index])
        assert torch.equal(layer.hidden_out, base.hidden_states[index + 1])
        torch.testing.assert_close(layer.hidden_in + layer.attn_output + layer.mlp_output, layer.hidden_out,
                                   rtol=1e-6, atol=1e-6)


def test_teacher_attention_sees_positions_and_is_causal(llama):
    model = npt_from(llama, npt_layers=[2])
    input_ids = ids(1, 12)
    a = capture_teacher(model, input_ids).layers[2].attn_output
    same = capture_teacher(model, input_ids, position_ids=torch.arange(12)[None] + 7).layers[2].attn_output
    torch.testing.assert_close(same, a, rtol=1e-5, atol=1e-6)  # RoPE is relative: a uniform shift changes nothing
    stretched = capture_teacher(model, input_ids, position_ids=torch.arange(12)[None] * 3).layers[2].attn_output
    assert not torch.allclose(a, stretched)
    changed = input_ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % VOCAB
    later = capture_teacher(model, changed).layers[2].attn_output
    assert torch.equal(a[0, :8], later[0, :8]) and not torch.allclose(a[0, 8:], later[0, 8:])


# ------------------------------------------------------------------------------------------ gradient isolation
def test_trainer_changes_only_np_parameters(llama, tmp_path):
    model = npt_from(llama, npt_layers=[2], np_modulation="gate_up").train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    data = Dataset.from_dict({"input_ids": ids(8, 16).tolist(), "labels": ids(8, 16).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             dataloader_pin_memory=False, disable_tqdm=True)
    options = NPTLossOptions(losses="direct+fidelity+regularization+mg", adaptive="uncertainty")
    trainer = NPTTrainer(model=model, args=args, train_dataset=data, loss_module=NPTLossModule(options))
    trainer.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.np_parameters()}
    after = model.state_dict()
    for name, tensor in before.items():
        if ".np_component." in name:
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"base parameter {name} changed"
    assert not torch.equal(trainer.loss_module.uncertainty.log_vars.detach(), torch.zeros(3))
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    for key in ("loss_direct", "loss_fidelity", "loss_regularization", "loss_mg", "loss_weight_direct", "loss_stage"):
        assert key in logged, key


def test_gradient_accumulation_equals_one_larger_batch(llama, tmp_path):
    data = Dataset.from_dict({"input_ids": ids(4, 16).tolist(), "labels": ids(4, 16).tolist()})
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = npt_from(llama, npt_layers=[2]).train()
        args = TrainingArguments(output_dir=str(tmp_path / f"ga{accumulation}"), max_steps=1, optim="sgd",
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                 learning_rate=1e-1, lr_scheduler_type="constant", logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, dataloader_pin_memory=False,
                                 disable_tqdm=True)
        trainer = NPTTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
        results.append((logged["loss"], dict(model.np_parameters())))
    (loss_full, full), (loss_accumulated, accumulated) = results
    assert math.isclose(loss_full, loss_accumulated, rel_tol=1e-4)
    for name, parameter in full.items():
        torch.testing.assert_close(accumulated[name], parameter, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("adaptive", ["uncertainty", "gradnorm", "invgrad"])
def test_checkpoints_keep_the_adaptive_loss_weights_and_resuming_restores_them(llama, tmp_path, adaptive):
    data = Dataset.from_dict({"input_ids": ids(8, 16).tolist(), "labels": ids(8, 16).tolist()})
    options = NPTLossOptions(losses="direct+fidelity+mg", adaptive=adaptive, adaptive_every=1)

    def trainer(name):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none",
                                 use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)
        return NPTTrainer(model=npt_from(llama, npt_layers=[2]).train(), args=args, train_dataset=data,
                          loss_module=NPTLossModule(options))

    first = trainer("first")
    first.train()
    learned = first.loss_module.weighting_state()
    checkpoint = tmp_path / "first" / "checkpoint-2"
    assert json.loads((checkpoint / LOSS_WEIGHTING_FILE).read_text()) == learned
    resumed = trainer("resumed")
    assert resumed.loss_module.weighting_state() != learned  # a fresh module starts from its initial weights
    resumed._load_from_checkpoint(str(checkpoint))  # what `train(resume_from_checkpoint=...)` calls first
    assert resumed.loss_module.weighting_state() == learned


def test_trainer_rejects_other_models():
    with pytest.raises(ValueError, match="NPTForCausalLM"):
        NPTTrainer(model=base_llama(), args=TrainingArguments(output_dir="/tmp/unused", report_to="none"))


def test_evaluation_loss_is_the_npt_cross_entropy(llama, tmp_path):
    model = npt_from(llama, npt_layers=[2])
    data = Dataset.from_dict({"input_ids": ids(4, 16).tolist(), "labels": ids(4, 16).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
                             dataloader_pin_memory=False, disable_tqdm=True)
    metrics = NPTTrainer(model=model, args=args, eval_dataset=data).evaluate()
    with torch.no_grad():
        expected = model(torch.tensor(data["input_ids"]), labels=torch.tensor(data["labels"])).loss
    assert math.isclose(metrics["eval_loss"], float(expected), rel_tol=1e-5)


# --------------------------------------------------------------------------------------------- the experiment
def test_ablation_runner_on_a_micro_setting(llama, tmp_path):
    from benchmarks.npt_losses import CONFIGS, plot, run_config

    llama.save_pretrained(tmp_path / "teacher")
    rows = [{"input_ids": row} for row in ids(12, 16).tolist()]
    blocks = {"train": Dataset.from_list(rows[:8]), "validation": rows[8:]}
    preset = dict(np_rank=8, steps=4, lr=1e-2, batch_size=4, eval_batches=1, eval_every=2)
    results = [run_config(name, tmp_path / "teacher", [2], *CONFIGS[name], blocks, preset, tmp_path / "work")
               for name in ("base", "orthogonality_seed")]
    good, failed = results
    assert {"kl", "top1", "ppl_base", "ppl_npt", "ppl_drop", "recovery", "direct_nmse", "s_var"} <= set(good["after"])
    assert [point["step"] for point in good["curve"]] == [0, 2, 4]
    assert good["after"]["ppl_base"] == pytest.approx(good["before"]["ppl_base"])  # the teacher never changes
    assert "shapes cannot be multiplied" in failed["error"]
    plot({"preset": "micro", "settings": {**preset, "seeds": 1}, "results": results}, tmp_path)
    assert (tmp_path / "ablation.png").exists() and (tmp_path / "curves.png").exists()


def test_config_signature_names_every_llama_field_with_llamas_default():
    llama = inspect.signature(LlamaConfig.__init__).parameters
    npt = inspect.signature(NPTConfig.__init__).parameters
    llama_fields = [name for name, p in llama.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert llama_fields, "LlamaConfig's own fields are keyword-only in transformers 5.24"
    for name in llama_fields:
        assert name in npt, f"NPTConfig's signature lacks the Llama field {name}"
        assert npt[name].default == llama[name].default, name
    assert NPTConfig().to_llama_config().to_dict() == LlamaConfig().to_dict() | {"model_type": "llama"}
