"""Bicameral FFT byte LM (seed 000): the long convolution, causality, the cutoff mask, the state cache, the dual
head, byte → teacher-token alignment, the dual-head trainer and the cutoff curriculum."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, TrainingArguments

import hf_models
from hf_models.bicameral import BicameralConfig, BicameralForCausalLM
from hf_models.bicameral.modeling_bicameral import (
    BicameralCausalLMOutput,
    cutoff_mask,
    dense_causal_conv,
    direct_causal_conv,
    estimate_flops_per_byte,
    fft_causal_conv,
    parameter_breakdown,
)
from hf_models.registry import get_spec
from training.common import UsageError
from training.data import tokenize_and_pack
from training.dual_head import (
    IGNORE_INDEX,
    CutoffCurriculum,
    DualHeadTrainer,
    add_token_labels,
    byte_token_targets,
    curriculum_stages,
    decode_utf8_with_offsets,
)

from .conftest import assert_same_generation, left_padded

SPEC = get_spec("bicameral_lm")


def tiny(seed: int = 0, **overrides) -> BicameralForCausalLM:
    torch.manual_seed(seed)
    return BicameralForCausalLM(SPEC.make_config(overrides, tiny=True)).eval()


def scramble(model: BicameralForCausalLM, seed: int = 1) -> BicameralForCausalLM:
    """Move every weight away from its (partly symmetric) initialisation, so gates, phases and mixes all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def byte_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The long convolution


@pytest.mark.parametrize("length,taps", [(1, 1), (5, 8), (37, 8), (64, 17), (100, 100)])
def test_fft_convolution_equals_direct_convolution(length, taps):
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 3, generator=generator, dtype=torch.float64)
    kernel = torch.randn(taps, generator=generator, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for t in range(length):
        for j in range(min(taps, t + 1)):
            expected[:, t] += kernel[j] * x[:, t - j]
    torch.testing.assert_close(direct_causal_conv(x, kernel), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fft_causal_conv(x, kernel), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense_causal_conv(x, kernel), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["fft", "dense"])
def test_both_sequence_convolutions_give_the_same_model_and_gradients(impl):
    """`conv_impl="fft"` and `"dense"` give the same logits and gradients, and `"auto"` picks dense below
    `fft_min_length` positions and FFTs from it (the other path is made to fail to tell them apart)."""
    reference = scramble(tiny(conv_impl="fft" if impl == "dense" else "dense"))
    model = scramble(tiny(conv_impl=impl))
    ids = byte_ids(2, 40)
    for subject in (reference, model):
        subject.train(False)
        subject(ids, labels=ids).loss.backward()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_auto_convolution_switches_at_fft_min_length(monkeypatch):
    import hf_models.bicameral.modeling_bicameral as modeling

    calls = []
    monkeypatch.setattr(modeling, "fft_causal_conv", lambda x, k: calls.append("fft") or torch.zeros_like(x))
    monkeypatch.setattr(modeling, "dense_causal_conv", lambda x, k: calls.append("dense") or torch.zeros_like(x))
    model = tiny(conv_impl="auto", fft_min_length=16)
    with torch.no_grad():
        model(byte_ids(1, 15), use_cache=False)
        model(byte_ids(1, 16), use_cache=False)
    layers = model.config.num_hidden_layers
    assert calls == ["dense"] * layers + ["fft"] * layers


def test_fft_convolution_does_not_wrap_around():
    x = torch.zeros(1, 16, 1, dtype=torch.float64)
    x[0, -1] = 1.0  # the last input must reach no earlier output through the circular FFT
    out = fft_causal_conv(x, torch.ones(16, dtype=torch.float64))
    assert out[0, :-1].abs().max() < 1e-12 and abs(out[0, -1, 0] - 1.0) < 1e-12


def test_cutoff_mask_is_ones_raised_cosine_then_zeros():
    mask = cutoff_mask(65, cutoff=20, transition_bins=5, dtype=torch.float64)
    assert torch.equal(mask[:15], torch.ones(15, dtype=torch.float64))
    ramp = torch.tensor([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)], dtype=torch.float64)
    torch.testing.assert_close(mask[15:20], ramp)
    assert mask[15] == 1.0 and mask[19] == 0.0 and torch.all(mask[15:20].diff() < 0)
    assert torch.equal(mask[20:], torch.zeros(45, dtype=torch.float64))
    assert torch.equal(cutoff_mask(65, None, 5), torch.ones(65))
    assert torch.equal(cutoff_mask(65, 65, 5), torch.ones(65))
    torch.testing.assert_close(cutoff_mask(65, 3, 32)[:4], torch.tensor([1.0, 0.5, 0.0, 0.0]))  # roll-off clamped


def test_a_block_with_scrambled_weights_is_the_documented_math():
    """One block against the module docstring's formulas written out (`nn.Conv1d` for the time path, a direct
    convolution for the frequency path, the fusion term by term), every weight and bias away from its init."""
    model = scramble(tiny(num_hidden_layers=1, dropout=0.0))
    block = model.model.layers[0]
    h = torch.randn(2, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 11)
    mask[1, :3] = 0
    with torch.no_grad():
        x = block.norm(h) * mask[..., None]
        context = x.cumsum(1) / mask.cumsum(1).clamp(min=1)[..., None]
        y_freq = (block.spectral_gain * torch.sigmoid(block.freq_context_gate(context))
                  * direct_causal_conv(x, block.effective_kernel()))
        width = model.config.time_kernel_size
        time_conv = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), block.time_conv.weight, block.time_conv.bias,
                             groups=x.shape[-1]).transpose(1, 2)
        y_time = torch.sigmoid(block.time_context_gate(context)) * time_conv
        a_freq, a_time = torch.sigmoid(block.alpha_freq), torch.sigmoid(block.alpha_time)
        y = (a_freq * y_freq + a_time * y_time) / (a_freq + a_time) + 0.1 * block.cross_mix(torch.cat([y_freq, y_time],
                                                                                                      -1))
        h = h + y
        expected = h + block.ffn_down(F.gelu(block.ffn_up(block.ffn_norm(h))))
        torch.testing.assert_close(block(h - y, mask), expected, rtol=1e-5, atol=1e-5)


def test_effective_kernel_is_the_gated_kernel_without_cutoff_and_low_passed_with_one():
    model = tiny(max_position_embeddings=64, kernel_len=16)
    block = model.model.layers[0]
    with torch.no_grad():
        block.kernel.normal_()
    # Uniform gates (init logit 2), no cutoff: the filter is the constant sigmoid(2) and the kernel only scales.
    torch.testing.assert_close(block.effective_kernel(), torch.sigmoid(torch.tensor(2.0)) * block.kernel.detach())
    size = model.config.fft_size

    def high_share(kernel):
        power = torch.fft.rfft(kernel.detach(), n=size).abs() ** 2
        return float(power[12:].sum() / power.sum())

    model.set_cutoff(12)
    assert model.config.cutoff == 12
    assert high_share(block.effective_kernel()) < 0.2 * high_share(block.kernel)
    assert block.effective_kernel().shape == (16,)
    with pytest.raises(ValueError, match="cutoff"):
        model.set_cutoff(10_000)


# ---------------------------------------------------------------------------------------------------------------
# Causality


CAUSAL = [dict(), dict(cutoff=12, transition_bins=4), dict(kernel_len=2, time_kernel_size=5)]
LEAKY = [dict(context_pooling="global"), dict(spectral_gating="signal", cutoff=12),
         dict(spectral_gating="signal", phase_activation=True)]


def _future_influence(overrides) -> float:
    model = scramble(tiny(**overrides)).double()
    ids = byte_ids(2, 40)
    changed = ids.clone()
    changed[:, 25:] = byte_ids(2, 15, seed=9)
    with torch.no_grad():
        a = model(ids, use_cache=False).logits[:, :25]
        b = model(changed, use_cache=False).logits[:, :25]
    return float((a - b).abs().max())


@pytest.mark.parametrize("overrides", CAUSAL, ids=str)
def test_no_future_byte_reaches_an_earlier_output(overrides):
    assert BicameralConfig(**{**SPEC.tiny_config, **overrides}).is_causal
    assert _future_influence(overrides) < 1e-12  # float64 rounding of the FFT only


@pytest.mark.parametrize("overrides", LEAKY, ids=str)
def test_the_original_variants_leak_future_bytes(overrides):
    assert not BicameralConfig(**{**SPEC.tiny_config, **overrides}).is_causal
    assert _future_influence(overrides) > 1e-6


def test_leaky_variant_refuses_cached_generation_but_generates_uncached():
    model = tiny(context_pooling="global")
    ids = byte_ids(1, 5)
    with pytest.raises(ValueError, match="not causal"):
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, eos_token_id=None)
    assert out.shape == (1, 8)


# ---------------------------------------------------------------------------------------------------------------
# The state cache


@pytest.mark.parametrize("overrides", CAUSAL, ids=str)
def test_cached_steps_equal_the_full_forward(overrides):
    model = scramble(tiny(**overrides))
    ids = byte_ids(2, 30)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :11], use_cache=True)
        cache, pieces = first.cache, [first.logits]
        for t in range(11, 20):  # decode steps (K-tap dot products)
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            pieces.append(step.logits)
        pieces.append(model(ids[:, 20:], cache=cache, use_cache=True).logits)  # a multi-byte continuation (FFT)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_a_cutoff_change_mid_generation_rebuilds_the_cached_kernels():
    model = scramble(tiny(num_hidden_layers=1))  # one layer: its cached inputs do not depend on the cutoff
    ids = byte_ids(2, 16)
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        model.set_cutoff(4)
        step = model(ids[:, 10:11], cache=cache, use_cache=True).logits
        full = model(ids[:, :11], use_cache=False).logits[:, -1:]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.kernels == {}


def test_a_cutoff_change_mid_generation_with_two_layers_is_refused_until_re_prefilled():
    model = scramble(tiny(num_hidden_layers=2))  # layer 1's cached inputs were computed under the old cutoff
    ids = byte_ids(2, 16)
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        model.set_cutoff(4)
        with pytest.raises(ValueError, match="cutoff changed"):
            model(ids[:, 10:11], cache=cache, use_cache=True)
        cache.reset()
        model(ids[:, :10], cache=cache, use_cache=True)  # re-prefilled under the new cutoff
        step = model(ids[:, 10:11], cache=cache, use_cache=True).logits
        full = model(ids[:, :11], use_cache=False).logits[:, -1:]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_left_padded_rows_equal_unpadded_rows_with_scrambled_weights():
    # The default init zeroes the context gates, so padding leaking into the context mean would not show there.
    model = scramble(tiny(num_hidden_layers=2))
    rows = [byte_ids(1, 9, seed=2)[0], byte_ids(1, 4, seed=3)[0]]
    input_ids, attention_mask = left_padded(rows)
    width = input_ids.shape[1]
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=257, output_scores=True,
                  return_dict_in_generate=True)
    for use_cache in (True, False):
        with torch.no_grad():
            batched_logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        batched = model.generate(input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        for i, row in enumerate(rows):
            with torch.no_grad():
                alone_logits = model(row[None], use_cache=False).logits
            torch.testing.assert_close(batched_logits[i, width - len(row):], alone_logits[0], rtol=1e-4, atol=1e-4)
            alone = model.generate(row[None], use_cache=use_cache, **kwargs)
            assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):])
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                torch.testing.assert_close(step_batched[i], step_alone[0], rtol=1e-4, atol=1e-4)


def test_labels_with_logits_to_keep_is_a_clear_error():
    model = tiny()
    ids = byte_ids(1, 8)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_cache_state_does_not_grow_with_the_position():
    model = tiny()
    with torch.no_grad():
        cache = model(byte_ids(1, 3), use_cache=True).cache
        shapes = [{name: t.shape for name, t in layer.states.items()} for layer in cache.layers]
        for t in range(40):
            cache = model(byte_ids(1, 1, seed=t), cache=cache, use_cache=True).cache
    assert [{name: t.shape for name, t in layer.states.items()} for layer in cache.layers] == shapes
    assert cache.get_seq_length() == 43
    assert shapes[0]["inputs"] == (1, model.config.kernel_len, model.config.hidden_size)


def test_the_decode_step_compiles_to_one_graph_and_compiled_generate_equals_eager():
    """Under `torch.compile(fullgraph=True)` (which raises on a graph break) every decode step reuses one graph (the
    ring is indexed by the tensor `cache_position`, the Python count catches up eagerly) and equals the uncached
    forward; `generate(compile_config=...)` gives eager decoding's tokens and scores."""
    from torch._dynamo.testing import CompileCounter
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = scramble(tiny(num_hidden_layers=2, cutoff=12))
    ids = byte_ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, 6:]
        cache = model(ids[:, :6], use_cache=True).cache
        counter = CompileCounter()
        step = torch.compile(lambda x, cache: model(x, cache=cache, use_cache=True).logits, backend=counter,
                             fullgraph=True)
        logits = torch.cat([step(ids[:, t:t + 1], cache) for t in range(6, 20)], dim=1)
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1, counter.frame_count
    assert cache.get_seq_length() == 20
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True  # the library compiles only on accelerators unless told otherwise
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=257, output_scores=True,
                  return_dict_in_generate=True)
    eager = model.generate(ids[:, :6], **kwargs)
    compiled = model.generate(ids[:, :6], compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_decode_tables_follow_in_place_weight_changes():
    """The fused decode tables are reused across caches while the weights are unchanged and rebuilt after an
    in-place change (an optimiser step): cached decoding then still equals the uncached forward."""
    model = scramble(tiny(num_hidden_layers=2))
    ids = byte_ids(2, 12)
    with torch.no_grad():
        model(ids[:, :4], use_cache=True)
        first = model.model.layers[0]._tables_memo[1]
        model(ids[:, :4], use_cache=True)
        assert model.model.layers[0]._tables_memo[1] is first
        for name in ("cross_mix", "freq_context_gate"):
            getattr(model.model.layers[0], name).weight.mul_(1.5)
        model.model.layers[1].kernel.mul_(-2.0)
        cache = model(ids[:, :4], use_cache=True).cache
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(4, 12)], dim=1)
        full = model(ids, use_cache=False).logits[:, 4:]
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_generate_cached_equals_uncached_with_a_cutoff_and_a_batch():
    model = scramble(tiny(cutoff=12))
    ids = byte_ids(3, 9)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=257, output_scores=True,
                  return_dict_in_generate=True)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert_same_generation(cached, uncached)


# ---------------------------------------------------------------------------------------------------------------
# Heads and losses


def test_remove_token_head_leaves_byte_logits_bit_identical(tmp_path):
    model = scramble(tiny())
    ids = byte_ids(2, 20)
    calls = []
    model.token_head.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        before = model(ids).logits
        assert not calls, "the token head ran although nobody asked for token logits"
        assert model(ids, return_token_logits=True).token_logits.shape == (2, 20, 300) and calls
        model.remove_token_head()
        after = model(ids).logits
    assert torch.equal(before, after)
    assert model.token_head is None and model.config.token_vocab_size == 0
    with pytest.raises(ValueError, match="no token head"):
        model(ids, return_token_logits=True)
    model.save_pretrained(tmp_path)
    loaded = BicameralForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.token_head is None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_token_loss_is_the_cross_entropy_of_the_current_token_and_reaches_the_backbone():
    model = tiny().train()
    ids = byte_ids(2, 16)
    token_labels = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    token_labels[0, :4] = IGNORE_INDEX
    output = model(ids, token_labels=token_labels)
    expected = F.cross_entropy(output.token_logits.reshape(-1, 300), token_labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.token_loss, expected)
    assert output.loss is None
    output.token_loss.backward()
    assert model.lm_head.weight.grad is None
    for name, parameter in model.model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_chunk_objective_predicts_chunk_size_ahead_and_generates_by_chunks():
    model = scramble(tiny(chunk_size=3))
    ids = byte_ids(2, 16)
    with torch.no_grad():
        output = model(ids, labels=ids)
    expected = F.cross_entropy(output.logits[:, :-3].reshape(-1, 259), ids[:, 3:].reshape(-1))
    torch.testing.assert_close(output.loss, expected)
    with pytest.raises(ValueError, match="generate_chunks"):
        model.generate(ids, max_new_tokens=2)
    cached = model.generate_chunks(ids, 10, use_cache=True)
    uncached = model.generate_chunks(ids, 10, use_cache=False)
    assert cached.shape == (2, 26) and torch.equal(cached, uncached)
    with torch.no_grad():  # the first chunk is the argmax of the prompt's last 3 positions
        assert torch.equal(cached[:, 16:19], model(ids).logits[:, -3:].argmax(-1))


def test_token_head_cost_is_counted_honestly():
    model = tiny()
    parts = parameter_breakdown(model)
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    assert parts["token_head"] == 32 * 300 + 300
    seed = estimate_flops_per_byte(BicameralConfig())  # the seed's sizes: C=512, 6 layers, GPT-2's 50257 tokens
    # "+1% compute" is wrong: the token head's matmul alone outweighs every linear layer of the backbone.
    assert seed["token_head_flops_per_byte"] > seed["backbone_linear_flops_per_byte"]
    assert seed["token_head_flops_per_byte"] > 0.5 * seed["backbone_flops_per_byte"]
    assert 512 * 50257 > 0.3 * sum(p.numel() for p in BicameralForCausalLM(BicameralConfig(
        num_hidden_layers=6, hidden_size=512)).parameters())


# ---------------------------------------------------------------------------------------------------------------
# Byte -> teacher-token alignment


def byte_level_teacher(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with a fixed vocabulary: the 256 byte symbols, the given merges, EOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


TEACHER = byte_level_teacher([("T", "h"), ("Th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("Ã", "©")])


def token_id(token: str) -> int:
    return TEACHER.convert_tokens_to_ids(token)


def test_alignment_gives_every_byte_its_covering_token_leading_space_included():
    targets = byte_token_targets("The cat", TEACHER)
    assert targets == [token_id("The")] * 3 + [token_id("Ġcat")] * 4


def test_alignment_of_multi_byte_characters():
    # "é" is merged into one token covering both its bytes; "😀" (4 bytes) is split into 4 byte tokens, which
    # share the character's span and get one byte each; "日" (3 bytes) likewise.
    text = "é😀日"
    targets = byte_token_targets(text, TEACHER)
    assert len(targets) == len(text.encode()) == 9
    assert targets[:2] == [token_id("Ã©")] * 2
    byte_symbols = TEACHER.convert_ids_to_tokens(TEACHER("😀日")["input_ids"])
    assert targets[2:] == [token_id(symbol) for symbol in byte_symbols] and len(byte_symbols) == 7


def test_alignment_of_a_multi_byte_character_merged_with_the_space_before_it():
    # " 😀" -> "ĠðŁ" (the space and 2 of the emoji's 4 bytes, character span (0, 2)), "ĺ", "Ģ" (span (1, 2) each):
    # the overlapping spans form one group of 5 bytes, each token taking the bytes it holds.
    teacher = byte_level_teacher([("Ġ", "ð"), ("Ġð", "Ł")])
    tokens = teacher.convert_ids_to_tokens(teacher(" 😀")["input_ids"])
    assert tokens == ["ĠðŁ", "ĺ", "Ģ"]
    ids = [teacher.convert_tokens_to_ids(token) for token in tokens]
    assert byte_token_targets(" 😀!", teacher) == [ids[0]] * 3 + [ids[1], ids[2]] + \
        teacher.convert_tokens_to_ids(["!"])


def test_alignment_of_invalid_utf8_and_uncovered_bytes():
    text, offsets = decode_utf8_with_offsets(b"a\xffb\xe2\x82")  # a stray byte, then a truncated 3-byte sequence
    assert text == "a\ufffdb\ufffd\ufffd" and offsets == [0, 1, 2, 3, 4, 5]
    targets = byte_token_targets(b"a\xffb", TEACHER)
    replacement = TEACHER.convert_ids_to_tokens(TEACHER("\ufffd")["input_ids"])
    assert targets == [token_id("a"), token_id(replacement[0]), token_id("b")]
    # A teacher whose pre-tokenizer drops whitespace covers no space: those bytes get the ignore index.
    backend = Tokenizer(models.WordLevel({"the": 0, "cat": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert byte_token_targets("the  cat", words) == [0, 0, 0, IGNORE_INDEX, IGNORE_INDEX, 1, 1, 1]


def test_alignment_needs_offsets():
    with pytest.raises(ValueError, match="offsets"):
        byte_token_targets("abc", hf_models.ByteTokenizer())


def test_token_labels_follow_the_packed_byte_blocks_and_keep_cut_tokens():
    documents = Dataset.from_dict({"text": ["The The cat", "é The", "cat cat The"]})
    byte_tokenizer = hf_models.ByteTokenizer()
    blocks = tokenize_and_pack(documents, byte_tokenizer, 8).blocks
    labelled = add_token_labels(blocks, documents, TEACHER, byte_tokenizer)
    stream = []
    for text in documents["text"]:
        stream += byte_token_targets(text, TEACHER) + [TEACHER.eos_token_id]
    rows = labelled["token_labels"]
    assert rows == [stream[i * 8:(i + 1) * 8] for i in range(len(rows))]
    # " cat" (bytes 7-10 of the first document) is cut by the first block boundary: both pieces keep its id.
    assert rows[0][7] == rows[1][0] == rows[1][1] == rows[1][2] == token_id("Ġcat")
    eos = [i for i, b in enumerate(labelled["input_ids"][2]) if b == byte_tokenizer.eos_token_id]
    assert eos and all(labelled["token_labels"][2][i] == TEACHER.eos_token_id for i in eos)
    shifted = Dataset.from_dict({"input_ids": [row[1:] + [0] for row in blocks["input_ids"]]})
    with pytest.raises(ValueError, match="not packed"):
        add_token_labels(shifted, documents, TEACHER, byte_tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Trainer and curriculum


def _blocks(length: int = 16, rows: int = 16) -> Dataset:
    ids = byte_ids(rows, length, seed=5)
    tokens = torch.randint(0, 300, (rows, length), generator=torch.Generator().manual_seed(6))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "token_labels": tokens.tolist()})


def _args(tmp_path, steps: int, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, seed=0, dataloader_pin_memory=False, disable_tqdm=True, **kwargs)


def test_token_weight_zero_trains_exactly_the_single_head_model(tmp_path):
    dual, single = tiny(token_loss_weight=0.0), tiny(token_vocab_size=0)
    single.load_state_dict({k: v for k, v in dual.state_dict().items() if not k.startswith("token_head")})
    data = _blocks()
    for model in (dual, single):
        DualHeadTrainer(model=model.train(), args=_args(tmp_path, 4), train_dataset=data).train()
    for name, parameter in single.named_parameters():
        assert torch.equal(parameter, dict(dual.named_parameters())[name]), name


def test_trainer_logs_both_losses_and_the_weighted_total(tmp_path):
    model = tiny()
    trainer = DualHeadTrainer(model=model.train(), args=_args(tmp_path, 3), train_dataset=_blocks())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["loss_char"] + 0.5 * entry["loss_token"], abs=2e-4)
        assert entry["cutoff"] == model.config.num_freq_bins
    metrics = trainer.evaluate(_blocks().remove_columns("token_labels"))
    assert "eval_loss" in metrics  # byte cross-entropy only


def test_curriculum_raises_the_cutoff_exactly_when_the_plateau_rule_says(tmp_path):
    model = tiny(cutoff=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    curriculum = CutoffCurriculum(curriculum_stages(8, [16, 4]), window=2, patience=3, threshold=0.01)
    assert curriculum.stages == [16, None]

    class State:
        global_step = 0
        log_history: list = []

    state = State()
    losses = [5, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    raised_at = []
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        before = model.config.cutoff
        curriculum.on_log(None, state, None, logs={"loss": 9.0, "loss_char": loss}, model=model,
                          optimizer=optimizer, lr_scheduler=scheduler)
        if model.config.cutoff != before:
            raised_at.append((step, model.config.cutoff))
    # best improves through step 4 (means 4.5, 3.5, 3.0); steps 5, 6, 7 do not improve -> raise at 7; the best is
    # reset, the mean needs 2 new steps (8, 9: best 3.0), then 10, 11, 12 stall -> raise at 12; then no stage left.
    assert raised_at == [(7, 16), (12, None)]
    assert [event["step"] for event in state.log_history] == [7, 12]
    assert optimizer.param_groups[0]["lr"] == 0.25 and scheduler.base_lrs == [0.25]
    # A run resumed from a checkpoint replays the raises of its restored log history.
    resumed_model, resumed = tiny(cutoff=8), CutoffCurriculum(curriculum_stages(8, [16]), window=2, patience=3)
    state.global_step = 13
    resumed.on_train_begin(None, state, None, model=resumed_model)
    assert resumed_model.config.cutoff is None and resumed.stages == [] and len(resumed.changes) == 2


def test_from_cli_fits_a_teacher_and_the_curriculum_runs(tmp_path, shakespeare_file):
    from training.data import DataArguments, load_documents

    documents = load_documents(DataArguments(train_file=str(shakespeare_file), max_train_documents=150))
    byte_tokenizer = hf_models.ByteTokenizer()
    blocks = tokenize_and_pack(documents["train"], byte_tokenizer, 32).blocks
    model = tiny(cutoff=8)
    trainer = DualHeadTrainer.from_cli(
        model=model.train(), args=_args(tmp_path, 4), tokenizer=byte_tokenizer, train_dataset=blocks,
        eval_dataset=blocks, train_texts=documents["train"],
        objective_args={"cutoff_schedule": [16, 32], "plateau_window": 1, "plateau_patience": 1,
                        "plateau_threshold": 100.0, "lr_on_raise": "keep"})
    assert "token_labels" in trainer.train_dataset.column_names
    assert (tmp_path / "teacher_tokenizer" / "tokenizer.json").exists()
    trainer.train()
    events = [entry for entry in trainer.state.log_history if "cutoff_to" in entry]
    assert [(e["step"], e["cutoff_from"], e["cutoff_to"]) for e in events] == [(2, 8, 16), (4, 16, 32)]
    cutoffs = [entry["cutoff"] for entry in trainer.state.log_history if "loss" in entry]
    assert cutoffs == [8, 8, 16, 16]
    assert all("loss_token" in entry for entry in trainer.state.log_history if "loss" in entry)
    with pytest.raises(ValueError, match="unknown objective"):
        DualHeadTrainer.from_cli(model=model, args=_args(tmp_path, 1), tokenizer=byte_tokenizer,
                                 train_dataset=blocks, eval_dataset=blocks, train_texts=documents["train"],
                                 objective_args={"teacher": "gpt2"})
    with pytest.raises(ValueError, match="token_vocab_size"):
        DualHeadTrainer.from_cli(model=tiny(token_vocab_size=100), args=_args(tmp_path, 1),
                                 tokenizer=byte_tokenizer, train_dataset=blocks, eval_dataset=blocks,
                                 train_texts=documents["train"], objective_args={})


def test_experiment_cli_runs_both_arms_from_the_same_weights(tmp_path, data_dir):
    from benchmarks import dual_head

    report = dual_head.main([
        "--preset", "smoke", "--data_dir", str(data_dir), "--output_dir", str(tmp_path),
        "--set", "max_steps=4,hidden_size=16,num_hidden_layers=1,block_size=32,max_position_embeddings=32,"
                 "kernel_len=8,cutoff=4,cutoff_schedule=[8],transition_bins=2,token_vocab_size=300,"
                 "max_train_documents=40,seeds=[0],corpora=[tinyshakespeare.txt],plateau_patience=1,"
                 "plateau_window=1,plateau_threshold=100.0,thresholds=[9.0,0.1]"])
    assert (tmp_path / "dual_head.json").exists() and (tmp_path / "dual_head_curves.png").exists()
    single, dual = report["runs"]
    assert (single["arm"], dual["arm"]) == ("single_head", "dual_head")
    assert single["parameters"]["token_head"] == 0 and dual["parameters"]["token_head"] == 16 * 300 + 300
    assert single["parameters"]["backbone"] == dual["parameters"]["backbone"]
    assert single["char_loss"][0] == dual["char_loss"][0]  # same initial weights and first batch
    assert all(t is None for t in single["token_loss"]) and all(t is not None for t in dual["token_loss"])
    assert single["steps_to_threshold"] == {"9.0": 1, "0.1": None}
    assert [(c["step"], c["cutoff_to"]) for c in dual["cutoff_changes"]] == [(2, 8), (4, None)]
    assert report["token_head_cost"]["seed_sizes_gpt2_head"]["parameters"]["token_head"] == 512 * 50257 + 50257
    assert len(report["verdict"]) == 1


def test_experiment_takes_a_given_teacher_and_sizes_the_token_head_by_it(tmp_path, data_dir):
    from benchmarks import dual_head

    teacher_dir = tmp_path / "teacher"
    byte_level_teacher([("T", "h"), ("Th", "e")]).save_pretrained(teacher_dir)
    report = dual_head.main([
        "--preset", "smoke", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"),
        "--teacher_tokenizer", str(teacher_dir),
        "--set", "max_steps=2,hidden_size=16,num_hidden_layers=1,block_size=32,max_position_embeddings=32,"
                 "kernel_len=8,cutoff=4,cutoff_schedule=[8],transition_bins=2,max_train_documents=20,"
                 "seeds=[0],corpora=[tinyshakespeare.txt]"])
    vocab = len(AutoTokenizer.from_pretrained(teacher_dir))
    teacher = report["teacher"]["tinyshakespeare.txt"]
    assert (teacher["vocab_size"], teacher["source"]) == (vocab, str(teacher_dir))
    assert report["runs"][1]["parameters"]["token_head"] == 16 * vocab + vocab
    with pytest.raises(UsageError, match="not a fast tokenizer"):
        hf_models.ByteTokenizer().save_pretrained(tmp_path / "slow")
        dual_head.main(["--preset", "smoke", "--data_dir", str(data_dir), "--teacher_tokenizer",
                        str(tmp_path / "slow"), "--output_dir", str(tmp_path / "out2")])


def test_crossover_benchmark_runs_and_finds_the_first_length_that_stays_faster(tmp_path):
    from benchmarks import fft_crossover

    rows = [{"length": 1, "a": 2, "b": 1}, {"length": 2, "a": 1, "b": 2}, {"length": 4, "a": 3, "b": 2},
            {"length": 8, "a": 1, "b": 2}, {"length": 16, "a": 1, "b": 3}]
    assert fft_crossover.crossover(rows, "a", "b") == 8 and fft_crossover.crossover(rows, "b", "a") is None
    report = fft_crossover.main(["--hidden_size", "16", "--head_dim", "8", "--kernel_len", "4", "--lengths", "8,16",
                                 "--device", "cpu", "--output_dir", str(tmp_path)])
    assert [row["length"] for row in report["rows"]] == [8, 16]
    assert all(row[name] > 0 for row in report["rows"] for name in fft_crossover.SERIES)
    assert (tmp_path / "fft_crossover.json").exists() and (tmp_path / "fft_crossover.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and resizing


def test_gradient_checkpointing_gives_the_same_gradients_with_both_heads():
    model = scramble(tiny(dropout=0.1)).train()
    input_ids, token_labels = byte_ids(2, 12), torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))

    def gradients() -> tuple[BicameralCausalLMOutput, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(0)
        outputs = model(input_ids, labels=input_ids, token_labels=token_labels)
        (outputs.loss + outputs.token_loss).backward()
        return outputs, {name: p.grad.clone() for name, p in model.named_parameters()}

    _, expected = gradients()
    model.gradient_checkpointing_enable()
    outputs, actual = gradients()
    assert outputs.cache is None  # checkpointed blocks run without a cache
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_resize_keeps_the_token_head_over_the_teacher_vocabulary():
    model = tiny()
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    assert model.lm_head.weight.shape[0] == model.config.vocab_size
    # the token head predicts the teacher's BPE tokens, whose vocabulary the byte vocabulary does not change
    assert model.token_head.weight.shape[0] == model.config.token_vocab_size == 300


def _dual_head_run(corpus: str, arm: str, seed: int, bpb: float, steps: dict[str, int | None],
                   seconds: float) -> dict:
    return {"corpus": corpus, "arm": arm, "seed": seed, "eval_bits_per_byte": bpb, "steps_to_threshold": steps,
            "median_step_seconds": seconds, "cutoff_changes": []}


def test_dual_head_summary_pairs_the_arms_by_seed():
    """Seed-common noise (0, 0.1, 0.2) is large next to the arms' per-seed differences: paired by seed the
    difference is beyond 2 SE, unpaired (difference of the means, their SEs combined) it would not be."""
    from benchmarks import dual_head

    single = {0: 2.0, 1: 2.1, 2: 2.2}
    dual = {0: 1.9, 1: 2.05, 2: 2.1}
    runs = [*(_dual_head_run("a", "single_head", s, b, {"2.0": 10 * (s + 1), "1.0": None}, 0.1)
              for s, b in single.items()),
            *(_dual_head_run("a", "dual_head", s, b, {"2.0": [5, 10, 30][s], "1.0": 50}, 0.1 * (1.2 + s / 10))
              for s, b in dual.items())]
    stats = dual_head.summarise(runs, {"corpora": ["a"], "thresholds": [2.0, 1.0]})
    single_row, dual_row = stats["summary"]
    assert (single_row["arm"], single_row["seeds"]) == ("single_head", [0, 1, 2])
    assert (single_row["eval_bpb"]["mean"], single_row["eval_bpb"]["se"]) == pytest.approx((2.1, 0.1 / 3 ** 0.5))
    assert single_row["steps_to_threshold"]["1.0"] is None and dual_row["steps_to_threshold"]["1.0"]["mean"] == 50
    (entry,) = stats["comparison"]
    difference = entry["bpb_dual_minus_single"]
    assert difference["differences"] == pytest.approx([-0.1, -0.05, -0.1])
    assert difference["mean"] == pytest.approx(-0.25 / 3)
    assert difference["se"] == pytest.approx(0.05 / 3 ** 0.5 / 3 ** 0.5)  # stdev 0.0289 / sqrt(3)
    assert difference["beyond_2se"] is True
    ratio = entry["steps_ratio_single_over_dual"]
    assert ratio["1.0"] is None  # a single-head seed never reached 1.0
    assert (ratio["2.0"]["mean"], ratio["2.0"]["se"]) == pytest.approx((5 / 3, 1 / 3))  # ratios 2, 2, 1
    assert entry["step_time_dual_over_single"]["mean"] == pytest.approx(1.3)
    assert "beyond 2 SE" in stats["verdict"][0]


def test_dual_head_summary_calls_a_difference_within_2_se_so():
    """Differences 0.1, 0, 0.05: mean 0.05, SE 0.029, 1.7 SE."""
    from benchmarks import dual_head

    runs = [_dual_head_run("a", arm, s, 2.0 + delta, {"2.0": 10}, 0.1)
            for s, deltas in enumerate([(0.0, 0.1), (0.0, 0.0), (0.0, 0.05)])
            for arm, delta in zip(dual_head.ARMS, deltas)]
    (entry,) = dual_head.summarise(runs, {"corpora": ["a"], "thresholds": [2.0]})["comparison"]
    assert entry["bpb_dual_minus_single"]["beyond_2se"] is False and "within 2 SE" in dual_head.corpus_verdict(entry)


def test_the_cards_dual_head_figures_are_the_committed_json():
    from pathlib import Path

    from benchmarks import dual_head

    root = Path(__file__).resolve().parents[1]
    relative = "model_cards/results/dual_head/smoke/dual_head.json"
    report = json.loads((root / relative).read_text())
    assert report["preset"] == "smoke" and len(report["settings"]["seeds"]) >= 3
    assert (root / relative).with_name("dual_head_curves.png").exists()
    assert dual_head.card_block(report, relative) in (root / "model_cards" / "bicameral_lm.md").read_text(), \
        f"regenerate with: python -m benchmarks.dual_head card {relative}"
