"""Behaviour of the Toeplitz mixer LM (issue 3): the mixer's exact math, head schedules, dense vs FFT, exact cached
decoding (all variants, both schedules, left padding), the cache's cost, the context policy, parameter count and
the experiment CLI."""

from __future__ import annotations

import itertools
import json

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hf_models import ToeplitzMixerConfig, ToeplitzMixerForCausalLM
from hf_models.toeplitz_mixer.modeling_toeplitz_mixer import (
    ToeplitzMixer,
    ToeplitzMixerCache,
    fft_causal_conv,
    toeplitz_matrix,
)

from .conftest import assert_same_generation
from .conftest import left_padded as _left_padded

VARIANTS = {
    "mean_proj": dict(do_toep_mean=True, do_toep_proj=True),
    "mean_noproj": dict(do_toep_mean=True, do_toep_proj=False),
    "nomean_proj": dict(do_toep_mean=False, do_toep_proj=True),
    "nomean_noproj": dict(do_toep_mean=False, do_toep_proj=False),
}


def tiny_config(**overrides) -> ToeplitzMixerConfig:
    fields = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_heads=4, intermediate_size=32,
                  max_position_embeddings=16, dropout=0.0)
    fields.update(overrides)
    return ToeplitzMixerConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> ToeplitzMixerForCausalLM:
    torch.manual_seed(seed)
    return ToeplitzMixerForCausalLM(tiny_config(**overrides)).eval()


def mixer(seed: int = 0, **overrides) -> ToeplitzMixer:
    torch.manual_seed(seed)
    module = ToeplitzMixer(tiny_config(**overrides), layer_idx=0)
    with torch.no_grad():
        module.kernel_weight.normal_(0, 0.5)
        module.position_bias.normal_(0, 0.5)
        if module.config.do_toep_proj:
            for linear in (module.inp_proj, module.out_proj):
                linear.weight.normal_(0, 0.3)
            module.inp_proj.bias.normal_(0, 0.3)
    return module


def ids(batch: int, length: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def positions(length: int) -> torch.Tensor:
    return torch.arange(length)[None]


def test_toeplitz_matrix_convention():
    kernel = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = torch.tensor([[1.0, 0, 0, 0], [2, 1, 0, 0], [3, 2, 1, 0], [4, 3, 2, 1]])
    assert torch.equal(toeplitz_matrix(kernel, 0, 4, 4)[0], expected)
    # rows 2..3 against 4 columns: the rows a chunk at positions 2, 3 needs
    assert torch.equal(toeplitz_matrix(kernel, 2, 2, 4)[0], expected[2:])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kernel_param", ["identity", "softplus"])
def test_mixer_equals_the_hand_formula(variant, kernel_param):
    module = mixer(kernel_param=kernel_param, **VARIANTS[variant])
    config = module.config
    u = torch.randn(3, 7, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = module(u, positions(7))
        p = module.inp_proj(u) if config.do_toep_proj else u
        k = module.kernel()
        expected = torch.zeros_like(p)
        for h, t in itertools.product(range(config.num_heads), range(7)):
            channels = slice(h * config.head_dim, (h + 1) * config.head_dim)
            y = sum(k[h, t - s] * p[:, s, channels] for s in range(t + 1))
            if config.do_toep_mean:
                y = y / k[h, : t + 1].sum()
            expected[:, t, channels] = y + module.position_bias[h, t]
        if config.do_toep_proj:
            expected = module.out_proj(expected)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "fft"])
@pytest.mark.parametrize("parallel", [True, False])
def test_model_is_causal(impl, parallel):
    for variant in VARIANTS.values():
        model = tiny_model(mixer_impl=impl, **variant)
        a, b = ids(2, 12), ids(2, 12, seed=9)
        b[:, :6] = a[:, :6]
        with torch.no_grad():
            logits_a = model(a, parallel_heads=parallel).logits
            logits_b = model(b, parallel_heads=parallel).logits
        if impl == "dense":
            assert torch.equal(logits_a[:, :6], logits_b[:, :6])
        else:  # an FFT mixes every position in frequency space: causal up to rounding
            torch.testing.assert_close(logits_a[:, :6], logits_b[:, :6], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits_a[:, 6:], logits_b[:, 6:])


@pytest.mark.parametrize("impl", ["dense", "fft"])
def test_parallel_heads_equal_sequential_heads(impl):
    for batch, heads, length in itertools.product((1, 3), (1, 2, 4), (1, 7, 16)):
        module = mixer(num_heads=heads, mixer_impl=impl)
        u = torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(heads))
        with torch.no_grad():
            parallel = module(u, positions(length), parallel=True)
            sequential = module(u, positions(length), parallel=False)
        assert (parallel - sequential).abs().max() <= 1e-5 * parallel.abs().max()


def test_heads_and_batch_rows_use_their_own_kernels():
    """The original expanded the kernels head-major against batch-major activations (row b got head b's kernel)."""
    module = mixer(num_heads=4, do_toep_mean=False, do_toep_proj=False)
    u = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = module(u, positions(5))
        for b in range(3):
            torch.testing.assert_close(module(u[b:b + 1], positions(5))[0], full[b])
        k, bias = module.kernel(), module.position_bias
        for h in range(4):
            channel = h * 4
            expected = torch.stack([sum(k[h, t - s] * u[:, s, channel] for s in range(t + 1)) + bias[h, t]
                                    for t in range(5)], dim=1)
            torch.testing.assert_close(full[:, :, channel], expected)


def test_dense_equals_fft_in_fp32_and_fft_stays_fp32_under_bf16_autocast():
    kernel = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    p = torch.randn(3, 50, 4, 8, generator=torch.Generator().manual_seed(1))
    dense = torch.einsum("hts,bshd->bthd", toeplitz_matrix(kernel, 0, 50, 50), p)
    fft = fft_causal_conv(p, kernel)
    assert (fft - dense).norm() / dense.norm() <= 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fft_causal_conv(p, kernel)
        from_bf16 = fft_causal_conv(p.bfloat16(), kernel.bfloat16())
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, fft)
    # bf16 inputs: the transform runs in float32 and only the result is rounded to bf16 (a bf16 FFT of length 128
    # would lose far more than the one rounding)
    assert from_bf16.dtype == torch.bfloat16
    expected = fft_causal_conv(p.bfloat16().float(), kernel.bfloat16().float()).bfloat16()
    assert torch.equal(from_bf16, expected)
    for variant in VARIANTS.values():
        dense_model, fft_model = tiny_model(**variant), tiny_model(mixer_impl="fft", **variant)
        with torch.no_grad():
            a, b = dense_model(ids(2, 16)).logits, fft_model(ids(2, 16)).logits
        assert (a - b).norm() / a.norm() <= 1e-4


def test_auto_impl_switches_to_fft_at_the_threshold(monkeypatch):
    calls = []
    original = fft_causal_conv
    monkeypatch.setattr("hf_models.toeplitz_mixer.modeling_toeplitz_mixer.fft_causal_conv",
                        lambda *args: calls.append(1) or original(*args))
    model = tiny_model(mixer_impl="auto", fft_min_length=8)
    with torch.no_grad():
        model(ids(1, 7))
        assert not calls
        model(ids(1, 8))
    assert len(calls) == 2  # one per layer


def test_mean_normaliser_makes_a_weighted_average():
    module = mixer(kernel_param="softplus", do_toep_mean=True, do_toep_proj=False)
    with torch.no_grad():
        module.position_bias.zero_()
    value = torch.randn(2, 1, 16)
    out = module(value.expand(2, 10, 16), positions(10))
    torch.testing.assert_close(out, value.expand(2, 10, 16), rtol=1e-5, atol=1e-5)


def _greedy(model, input_ids, attention_mask=None, use_cache=True, new_tokens=7, **kwargs):
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
        eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generation_equals_uncached_for_every_variant_and_schedule(variant):
    model = tiny_model(**VARIANTS[variant])
    rows = [ids(1, 6, seed=2)[0], ids(1, 3, seed=3)[0], ids(1, 5, seed=4)[0]]
    input_ids, mask = _left_padded(rows)
    reference = None
    for parallel in (True, False):
        cached = _greedy(model, input_ids, mask, use_cache=True, parallel_heads=parallel)
        uncached = _greedy(model, input_ids, mask, use_cache=False, parallel_heads=parallel)
        assert_same_generation(cached, uncached)
        reference = reference if reference is not None else cached.sequences
        assert torch.equal(cached.sequences, reference)
    for i, row in enumerate(rows):  # left padding is exact: each row alone gives the same tokens and scores
        alone = _greedy(model, row[None])
        assert torch.equal(alone.sequences[0, len(row):], reference[i, input_ids.shape[1]:])


def test_cached_logits_match_the_full_forward_step_by_step():
    model = tiny_model(kernel_param="identity", do_toep_mean=False)
    sequence = ids(2, 12)
    with torch.no_grad():
        full = model(sequence).logits
        output = model(sequence[:, :4], use_cache=True)
        torch.testing.assert_close(output.logits, full[:, :4], rtol=1e-5, atol=1e-5)
        cache = output.cache
        for t in range(4, 8, 2):  # chunks of two tokens
            step = model(sequence[:, t:t + 2], cache=cache, use_cache=True)
            torch.testing.assert_close(step.logits, full[:, t:t + 2], rtol=1e-5, atol=1e-5)
        for t in range(8, 12):  # then the single-token steps of decoding
            step = model(sequence[:, t:t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(step.logits, full[:, t:t + 1], rtol=1e-5, atol=1e-5)


def test_generate_passes_the_head_schedule_to_every_cached_step(monkeypatch):
    """The original's cached step ignored the schedule, so its 'sequential cached' speed measured nothing."""
    seen = []
    original = ToeplitzMixer._mix_history

    def spy(self, kernel, history, num_new, parallel, **kwargs):
        seen.append(parallel)
        return original(self, kernel, history, num_new, parallel, **kwargs)

    monkeypatch.setattr(ToeplitzMixer, "_mix_history", spy)
    model = tiny_model()
    _greedy(model, ids(2, 4), new_tokens=3, parallel_heads=False)
    assert seen and not any(seen)
    seen.clear()
    _greedy(model, ids(2, 4), new_tokens=3)
    assert seen and all(seen)


def test_cache_is_a_preallocated_history_written_in_place():
    model = tiny_model()
    config = model.config
    with torch.no_grad():
        output = model(ids(2, 5), use_cache=True)
        cache = output.cache
        assert isinstance(cache, ToeplitzMixerCache)
        history = cache.get_state(1, "history")
        assert history.shape == (2, config.num_heads, config.max_position_embeddings, config.head_dim)
        pointers = [cache.get_state(i, "history").data_ptr() for i in range(config.num_hidden_layers)]
        for step in range(4):
            model(ids(2, 1, seed=step), cache=cache, use_cache=True)
        assert cache.get_seq_length() == 9
        assert [cache.get_state(i, "history").data_ptr() for i in range(config.num_hidden_layers)] == pointers
        assert history[:, :, :9].abs().sum() > 0 and history[:, :, 9:].abs().sum() == 0


def _decode_logits(model, input_ids, mask, prompt, step=None):
    """Prefill `prompt` tokens, then feed the rest one token at a time (through `step` if given, with the one-column
    mask `generate` passes); the logits of every decoded position, `(B, T - prompt, V)`."""
    step = step or (lambda x, m, cache: model(x, attention_mask=m, cache=cache, use_cache=True).logits)
    with torch.no_grad():
        cache = model(input_ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True).cache
        logits = [step(input_ids[:, t:t + 1], mask[:, t:t + 1], cache)[:, -1]
                  for t in range(prompt, input_ids.shape[1])]
    return torch.stack(logits, dim=1), cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_decode_step_equals_dynamic_step_and_full_forward(variant):
    """The shape-static step (whole buffer, weights gathered by a tensor position) gives the dynamic step's logits,
    for both head schedules, a batch of 3 and a left-padded batch."""
    model = tiny_model(kernel_param="identity", **VARIANTS[variant])
    input_ids, mask = _left_padded([ids(1, 13, seed=2)[0], ids(1, 9, seed=3)[0], ids(1, 11, seed=4)[0]])
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask).logits[:, 4:]
    for parallel in (True, False):
        model.config.parallel_heads = parallel
        results = {}
        for mode in ("dynamic", "static"):
            model.config.decode_step = mode
            results[mode], cache = _decode_logits(model, input_ids, mask, prompt=4)
            torch.testing.assert_close(results[mode], full, rtol=1e-5, atol=1e-5)
            assert cache.get_seq_length() == input_ids.shape[1] == int(cache.cache_position)
            assert cache.get_state(0, "row_positions").tolist() == mask.sum(-1).tolist()
        torch.testing.assert_close(results["static"], results["dynamic"], rtol=1e-5, atol=1e-6)


def test_static_step_reads_only_the_filled_slots_and_writes_in_place():
    """The static step reads the whole buffer but weighs the slots after t by exactly 0, and writes slot t in place:
    garbage after t does not change the output."""
    model = tiny_model(decode_step="static")
    input_ids = ids(2, 8)
    with torch.no_grad():
        expected = model(input_ids).logits[:, -1]
        cache = model(input_ids[:, :7], use_cache=True).cache
        pointers = [cache.get_state(i, "history").data_ptr() for i in range(2)]
        for i in range(2):
            cache.get_state(i, "history")[:, :, 8:] = 1e6
        logits = model(input_ids[:, 7:], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert [cache.get_state(i, "history").data_ptr() for i in range(2)] == pointers


def check_compiled_decode_is_one_graph(model, prompt: int = 3, tolerance: float = 1e-5):
    """Decode a left-padded batch after `prompt` eager tokens through `torch.compile(fullgraph=True)` (which raises
    on a graph break): the logits equal the uncached forward and every step reuses one graph. Returns the cache."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    input_ids, mask = _left_padded([ids(1, 12, seed=5)[0], ids(1, 8, seed=6)[0]])
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask).logits[:, prompt:]
    counter = CompileCounter()
    compiled = torch.compile(lambda x, m, cache: model(x, attention_mask=m, cache=cache, use_cache=True).logits,
                             backend=counter, fullgraph=True)
    logits, cache = _decode_logits(model, input_ids, mask, prompt=prompt, step=compiled)
    torch.testing.assert_close(logits, full, rtol=tolerance, atol=tolerance)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()
    return cache


def test_static_decode_step_compiles_to_one_graph_without_breaks():
    """The default `decode_step="auto"` takes the static step under `torch.compile`: one graph for every step (no
    shape, and no Python int, depends on the position), and the Python token count catches up eagerly afterwards."""
    cache = check_compiled_decode_is_one_graph(tiny_model())
    assert cache.get_seq_length() == 12


def test_generate_with_compile_config_uses_the_compiled_static_step():
    """`generate(compile_config=...)` makes the model create its cache before the prefill, so `generate` runs the
    decode steps through `torch.compile`; tokens and scores equal eager decoding, and the context limit still
    raises before the step that would cross it."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = tiny_model()
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True  # the library compiles only on accelerators unless told otherwise
    input_ids, mask = _left_padded([ids(1, 6, seed=7)[0], ids(1, 4, seed=8)[0]])
    eager = _greedy(model, input_ids, mask)
    compiled = _greedy(model, input_ids, mask, compile_config=config)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(compiled.sequences, eager.sequences)
    for step_compiled, step_eager in zip(compiled.scores, eager.scores):
        torch.testing.assert_close(step_compiled, step_eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        _greedy(model, input_ids, mask, new_tokens=12, compile_config=config)
    torch._dynamo.reset()


class ElementCounter(TorchDispatchMode):
    """Counts the tensor elements every operator reads and writes: a measure of a step's work."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.elements += sum(t.numel() for t in tensors)
        return out


def test_one_decode_step_costs_linear_time_in_the_position():
    """The work of one cached step grows linearly with the number of cached tokens (O(t)), not quadratically, and
    the matrix products (the projections and the MLP) do not grow at all."""
    model = tiny_model(max_position_embeddings=200)
    work, flops = {}, {}
    with torch.no_grad():
        for past in (50, 100, 150):
            cache = model(ids(1, past), use_cache=True).cache
            with ElementCounter() as counter, FlopCounterMode(display=False) as flop_counter:
                model(ids(1, 1), cache=cache, use_cache=True)
            work[past], flops[past] = counter.elements, flop_counter.get_total_flops()
    first, second = work[100] - work[50], work[150] - work[100]
    assert first > 0 and second == first, work
    assert flops[50] == flops[100] == flops[150], flops


def test_context_overflow_error_is_clear_and_early():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(ids(1, 17))
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    for use_cache in (True, False):  # the prompt fits, the 17th position does not: refused before any forward
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            _greedy(model, ids(1, 12), new_tokens=6, use_cache=use_cache)
    assert calls == []
    _greedy(model, ids(1, 12), new_tokens=5)  # 16 positions read: fits
    hook.remove()


@pytest.mark.parametrize("decode_step", ["dynamic", "static"])
def test_sliding_recompute_cached_equals_uncached_past_the_context(decode_step):
    model = tiny_model(context_overflow="sliding_recompute", decode_step=decode_step)
    input_ids, mask = _left_padded([ids(1, 12, seed=5)[0], ids(1, 9, seed=6)[0]])
    cached = _greedy(model, input_ids, mask, new_tokens=10)
    uncached = _greedy(model, input_ids, mask, new_tokens=10, use_cache=False)
    assert_same_generation(cached, uncached)
    # past the context, each step reads exactly the last 16 tokens from position 0
    sequence = cached.sequences[:1]
    with torch.no_grad():
        window = model(sequence[:, -17:-1]).logits[0, -1]
    torch.testing.assert_close(cached.scores[-1][0], window, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_in_both_schedules_and_gradcheck():
    for parallel in (True, False):
        model = tiny_model().train()
        model(ids(2, 10), labels=ids(2, 10), parallel_heads=parallel).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    for impl in ("dense", "fft"):
        module = mixer(mixer_impl=impl, num_heads=2, do_toep_proj=False).double()
        u = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
        weight = module.kernel_weight
        assert torch.autograd.gradcheck(lambda u: module(u, positions(5)), (u,))
        assert torch.autograd.gradcheck(
            lambda w: torch.func.functional_call(module, {"kernel_weight": w}, (u.detach(), positions(5))),
            (weight.detach().clone().requires_grad_(),),
        )


def test_parameter_count_equals_the_closed_form():
    seed_sizes = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=10, num_heads=4, intermediate_size=512,
                      max_position_embeddings=512)
    for proj, expected in ((True, 14_747_136), (False, 9_499_136)):
        config = ToeplitzMixerConfig(do_toep_proj=proj, **seed_sizes)
        with torch.device("meta"):
            model = ToeplitzMixerForCausalLM(config)
        assert sum(p.numel() for p in model.parameters()) == expected == config.num_parameters_closed_form()
    small = tiny_config(do_toep_proj=False, tie_word_embeddings=True)
    assert sum(p.numel() for p in ToeplitzMixerForCausalLM(small).parameters()) == small.num_parameters_closed_form()


def test_loss_is_the_shifted_cross_entropy_with_ignored_labels():
    model = tiny_model()
    input_ids = ids(2, 9)
    labels = input_ids.clone()
    labels[1, 4] = -100
    with torch.no_grad():
        output = model(input_ids, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize(
    "overrides,field",
    [({"hidden_size": 18, "num_heads": 4}, "hidden_size"), ({"num_heads": 0}, "num_heads"),
     ({"mixer_impl": "winograd"}, "mixer_impl"), ({"max_position_embeddings": -1}, "max_position_embeddings"),
     ({"kernel_param": "exp"}, "kernel_param"), ({"decode_step": "jit"}, "decode_step"),
     ({"decode_step": True}, "decode_step")],
)
def test_bad_configs_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_original_preset_uses_the_published_tokenizer_with_the_hub_data_only():
    from benchmarks import toeplitz_variants

    parse = toeplitz_variants.build_parser().parse_args
    hub = toeplitz_variants.resolve_settings(parse(["--preset", "original", "--device", "cpu"]))["data"]
    assert (hub["dataset_name"], hub["tokenizer_name"]) == ("SimpleStories/SimpleStories",
                                                            "SimpleStories/SimpleStories-1.25M")
    local = toeplitz_variants.resolve_settings(parse(["--preset", "original", "--device", "cpu",
                                                      "--train_file", "a.txt"]))
    assert "tokenizer_name" not in local["data"] and local["data"]["train_file"] == "a.txt"
    with pytest.warns(FutureWarning, match="--preset seed_readme is deprecated"):
        old = toeplitz_variants.resolve_settings(parse(["--preset", "seed_readme", "--device", "cpu"]))
    assert old["preset"] == "original_readme" and old["training"]["max_steps"] == 20000


@pytest.mark.parametrize("field", ["new_tokens", "runs", "batch_size"])
def test_experiment_rejects_bad_benchmark_settings_before_training(field):
    from benchmarks import toeplitz_variants
    from training.common import UsageError

    parse = toeplitz_variants.build_parser().parse_args
    with pytest.raises(UsageError, match=f"bench.{field}"):
        toeplitz_variants.resolve_settings(parse(["--preset", "smoke", "--set", f"bench.{field}=0"]))
    with pytest.warns(FutureWarning, match=f"--bench_{field} is deprecated"):
        args = parse(["--preset", "smoke", f"--bench_{field}", "0"])
    with pytest.raises(UsageError, match=f"bench.{field}"):
        toeplitz_variants.resolve_settings(args)


def test_experiment_set_takes_section_dot_field_and_names_a_bad_one():
    from benchmarks import toeplitz_variants
    from training.common import UsageError

    parse = toeplitz_variants.build_parser().parse_args
    settings = toeplitz_variants.resolve_settings(parse(["--set", "model.hidden_size=64,training.max_steps=7"]))
    assert (settings["model"]["hidden_size"], settings["training"]["max_steps"]) == (64, 7)
    with pytest.raises(UsageError, match="expected section.field"):
        toeplitz_variants.resolve_settings(parse(["--set", "hidden_size=64"]))
    with pytest.raises(UsageError, match="unknown bench field"):
        toeplitz_variants.resolve_settings(parse(["--set", "bench.speed=1"]))


def test_experiment_cli_micro_run(tmp_path, stories_file):
    from benchmarks import analyze_toeplitz, toeplitz_variants

    run_dir = toeplitz_variants.main([
        "--preset", "smoke", "--train_file", str(stories_file), "--output_root", str(tmp_path),
        "--set", "training.max_steps=6,training.eval_steps=6,data.max_train_documents=120,data.vocab_size=300,"
                 "data.block_size=32,model.hidden_size=16,model.num_hidden_layers=1,model.num_heads=2,"
                 "model.intermediate_size=16,model.max_position_embeddings=64,bench.new_tokens=4,bench.runs=5,"
                 "bench.prompt_lengths=[1,8]",
        "--variants", "mean_proj,nomean_proj", "--seeds", "1,2", "--results_dir", str(tmp_path / "report"),
    ])
    results = json.loads((run_dir / "all_results.json").read_text())
    assert [(r["model_name"], r["seed"]) for r in results] == [("mean_proj", 1), ("nomean_proj", 1),
                                                               ("mean_proj", 2), ("nomean_proj", 2)]
    report = json.loads((tmp_path / "report" / "toeplitz_variants.json").read_text())
    assert [row["seeds"] for row in report["summary"]["variants"]] == [[1, 2], [1, 2]]
    (effect,) = report["summary"]["effects"]
    assert (effect["with"], effect["without"], effect["seeds"]) == ("mean_proj", "nomean_proj", [1, 2])
    assert "log_history" not in json.dumps(report) and (tmp_path / "report" / "toeplitz_variants.png").exists()
    metrics = json.loads((run_dir / "seed1" / "mean_proj" / "metrics.json").read_text())
    assert set(metrics) >= {"model_name", "config", "training", "generation", "speedups", "extra"}
    assert set(metrics["generation"]) == {"cached_parallel", "cached_sequential", "uncached_parallel",
                                          "uncached_sequential"}
    assert set(metrics["speedups"]) == {"cache_speedup_parallel", "cache_speedup_sequential",
                                        "parallel_speedup_cached", "parallel_speedup_uncached"}
    assert set(metrics["training"]) >= {"train_loss", "eval_loss", "train_runtime", "train_samples_per_second"}
    assert "train_loss_last_logged" in metrics["extra"] and "run_mean" not in json.dumps(metrics["extra"])
    verdicts = analyze_toeplitz.main([str(run_dir)])
    assert verdicts["best_eval_loss"] in {"mean_proj", "nomean_proj"}
    assert (run_dir / "comparison_plots.png").stat().st_size > 0


def test_the_identity_kernel_preset_warns_about_its_unstable_normaliser():
    from benchmarks import toeplitz_variants

    parse = toeplitz_variants.build_parser().parse_args
    with pytest.warns(UserWarning, match="cross zero"):
        toeplitz_variants.resolve_settings(parse(["--preset", "original", "--device", "cpu"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        toeplitz_variants.resolve_settings(parse(["--preset", "smoke", "--device", "cpu"]))


def _variant_run(variant: str, seed: int, eval_loss: float) -> dict:
    mean, proj = variant.split("_")
    return {"variant": variant, "seed": seed, "do_toep_mean": mean == "mean", "do_toep_proj": proj == "proj",
            "parallel_mixer": True, "eval_loss": eval_loss, "train_loss_last_logged": eval_loss - 0.2,
            "decode": [{"prompt_length": 1, "cached_tok_s": 100.0 * seed, "uncached_tok_s": 50.0,
                        "cache_speedup": 2.0 * seed}]}


def test_seed_summary_pairs_the_ablations_by_seed():
    """A seed-common offset (0, 0.5, 1.0) dwarfs the per-seed jitter: paired by seed the mean normaliser's effect
    with projections is beyond 2 SE (unpaired, the offset's spread would hide it); without projections it is
    1.7 SE (within 2 SE)."""
    from benchmarks import analyze_toeplitz

    common = {1: 0.0, 2: 0.5, 3: 1.0}
    losses = {"mean_proj": (5.0, {1: 0.0, 2: 0.0, 3: 0.0}), "mean_noproj": (4.5, {1: 0.0, 2: 0.0, 3: 0.0}),
              "nomean_proj": (5.3, {1: 0.0, 2: 0.02, 3: -0.02}), "nomean_noproj": (4.5, {1: -0.1, 2: 0.0, 3: -0.05})}
    runs = [_variant_run(name, seed, base + common[seed] + jitter[seed])
            for seed in common for name, (base, jitter) in losses.items()]
    summary = analyze_toeplitz.seed_summary(runs)
    rows = {row["variant"]: row for row in summary["variants"]}
    assert list(rows) == list(losses) and rows["mean_proj"]["seeds"] == [1, 2, 3]
    assert (rows["mean_proj"]["eval_loss"]["mean"], rows["mean_proj"]["eval_loss"]["se"]) == \
        pytest.approx((5.5, 0.5 / 3 ** 0.5))
    assert rows["mean_proj"]["decode"][0]["cached_tok_s"]["mean"] == pytest.approx(200.0)
    effects = {(e["with"], e["without"]): e for e in summary["effects"]}
    assert list(effects) == [("mean_proj", "nomean_proj"), ("mean_noproj", "nomean_noproj"),
                             ("mean_proj", "mean_noproj"), ("nomean_proj", "nomean_noproj")]
    normaliser = effects[("mean_proj", "nomean_proj")]
    assert normaliser["effect"] == "mean normaliser" and normaliser["differences"] == pytest.approx([-0.3, -0.32, -0.28])
    assert (normaliser["mean"], normaliser["se"]) == pytest.approx((-0.3, 0.02 / 3 ** 0.5))
    assert normaliser["beyond_2se"] is True
    within = effects[("mean_noproj", "nomean_noproj")]
    assert (within["mean"], within["se"]) == pytest.approx((0.05, 0.05 / 3 ** 0.5)) and within["beyond_2se"] is False
    assert "mean_proj − nomean_proj = -0.300 ± 0.012 over 3 paired seeds (lower with the flag; beyond 2 SE" in \
        analyze_toeplitz.seed_verdict(summary)


def test_the_cards_seed_experiment_figures_are_the_committed_json():
    from pathlib import Path

    from benchmarks import analyze_toeplitz

    root = Path(__file__).resolve().parents[1]
    relative = "model_cards/results/toeplitz_variants/smoke/toeplitz_variants.json"
    report = json.loads((root / relative).read_text())
    assert report["preset"] == "smoke" and len(report["settings"]["seeds"]) >= 3
    assert {len(row["seeds"]) for row in report["summary"]["variants"]} == {len(report["settings"]["seeds"])}
    assert report["summary"] == analyze_toeplitz.seed_summary(report["runs"])
    assert (root / relative).with_suffix(".png").exists()
    assert analyze_toeplitz.card_block(report, relative) in (root / "model_cards" / "toeplitz_mixer.md").read_text(), \
        f"regenerate with: python -m benchmarks.toeplitz_variants card {relative}"
