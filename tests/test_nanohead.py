"""Nanohead GPT (seed 003): the head split, the reference GPT at proportion 0, rotary only on normal heads,
caches (dynamic and static), attention-backend fallback for tiny head dims, and the sweep's estimator, metric and
CLI. Tiny configs, CPU, fixed seeds; the common battery (tests/test_common.py) covers the rest."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import StaticCache

import hf_models
from benchmarks import nanohead_sweep
from hf_models.nanohead import NanoheadConfig, NanoheadForCausalLM, calculate_nanohead_split
from hf_models.nanohead import modeling_nanohead
from training.tokenization import token_byte_lengths, train_bpe_tokenizer

from .conftest import assert_same_generation

TINY = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, nanohead_dim=3, max_position_embeddings=64)


def make_model(seed: int = 0, attn_implementation: str | None = None, **overrides) -> NanoheadForCausalLM:
    torch.manual_seed(seed)
    config = NanoheadConfig(**{**TINY, "nanohead_proportion": 0.4, **overrides})
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return NanoheadForCausalLM(config).eval()


def ids(batch: int, length: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, attention_mask=None, new_tokens=8, **kwargs):
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                          **kwargs)


# --- the split -------------------------------------------------------------------------------------------------

# (hidden, heads, kv heads, proportion, nanohead dim) -> (normal head dim, nanoheads, nano kv heads, achieved share)
SPLITS = [
    ((512, 4, 4, 0.0, 3), (128, 0, 0, 0.0)),
    ((512, 4, 4, 0.2, 3), (104, 32, 32, 0.1875)),  # 102 nano dims would leave 410: not 4 even heads
    ((512, 4, 4, 0.4, 3), (74, 72, 72, 0.421875)),
    ((512, 4, 4, 0.8, 3), (26, 136, 136, 0.796875)),
    ((768, 6, 2, 0.4, 3), (74, 108, 36, 0.421875)),  # GQA ratio 3 kept by the nanoheads
    ((48, 4, 2, 0.4, 3), (6, 8, 4, 0.5)),
    ((64, 4, 2, 0.5, 4), (8, 8, 4, 0.5)),
    ((256, 4, 4, 0.2, 2), (52, 24, 24, 0.1875)),
]


@pytest.mark.parametrize("args,expected", SPLITS, ids=[str(args) for args, _ in SPLITS])
def test_split_table(args, expected):
    hidden, heads, kv_heads, proportion, nano_dim = args
    split = calculate_nanohead_split(*args)
    assert (split.head_dim, split.num_nanoheads, split.num_nano_kv_heads, split.proportion) == expected
    assert split.num_heads == heads and split.num_kv_heads == kv_heads and split.nanohead_dim == nano_dim
    assert split.width == hidden and split.head_dim % 2 == 0


def test_split_invariants_and_nearest_allocation():
    for hidden in (64, 96, 128, 192, 256, 384):
        for heads, kv_heads in ((2, 2), (4, 4), (4, 2), (6, 3), (8, 2)):
            for proportion in (0.1, 0.25, 0.5, 0.75, 0.9):
                for nano_dim in (2, 3, 4, 5):
                    try:
                        split = calculate_nanohead_split(hidden, heads, kv_heads, proportion, nano_dim)
                    except ValueError:
                        continue
                    groups = heads // kv_heads
                    assert split.width == hidden and split.head_dim % 2 == 0 and split.num_nanoheads > 0
                    assert split.num_nanoheads == groups * split.num_nano_kv_heads
                    # no other valid allocation is nearer the requested width
                    best = min(abs(hidden - heads * d - proportion * hidden) for d in range(2, hidden // heads + 1, 2)
                               if hidden - heads * d > 0 and (hidden - heads * d) % (nano_dim * groups) == 0)
                    assert abs(split.nano_width - proportion * hidden) == best


@pytest.mark.parametrize(
    "args,match",
    [
        ((10, 4, 2, 0.5, 4), "no split"),
        ((50, 4, 2, 0.4, 4), "no split"),
        ((30, 4, 4, 0.0, 3), "hidden_size"),
        ((44, 4, 4, 0.0, 3), "even head"),
        ((512, 4, 3, 0.2, 3), "num_key_value_heads"),
        ((512, 4, 4, 1.0, 3), "nanohead_proportion"),
        ((512, 4, 4, -0.1, 3), "nanohead_proportion"),
        ((512, 4, 4, 0.2, 0), "nanohead_dim"),
    ],
)
def test_split_errors(args, match):
    with pytest.raises(ValueError, match=match):
        calculate_nanohead_split(*args)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"nanohead_proportion": 1.0}, "nanohead_proportion"),
        ({"nanohead_proportion": 1.5}, "nanohead_proportion"),
        ({"nanohead_dim": 0}, "nanohead_dim"),
        ({"nanohead_dim": -2}, "nanohead_dim"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 50, "nanohead_dim": 4}, "hidden_size"),
        ({"hidden_size": 46, "nanohead_proportion": 0.0}, "hidden_size"),
        ({"hidden_act": "tanh"}, "hidden_act"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"learnable_logit_scale": 1}, "learnable_logit_scale"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"loss_chunk_size": 2.5}, "loss_chunk_size"),
    ],
)
def test_invalid_config_is_rejected_at_config_time(overrides, field):
    with pytest.raises(ValueError, match=field):
        NanoheadConfig(**{**TINY, "nanohead_proportion": 0.4, **overrides})


@pytest.mark.parametrize("learnable_logit_scale", [False, True])
def test_parameter_count_is_the_same_at_every_proportion(learnable_logit_scale):
    counts = {}
    for proportion in (0.0, 0.2, 0.4, 0.6, 0.8):
        config = NanoheadConfig(**{**TINY, "hidden_size": 96, "intermediate_size": 384,
                                   "nanohead_proportion": proportion, "learnable_logit_scale": learnable_logit_scale})
        model = NanoheadForCausalLM(config)
        counts[proportion] = sum(p.numel() for p in model.parameters())
        assert counts[proportion] == nanohead_sweep.count_parameters(config)
        split = config.nanohead_split
        rows = model.model.layers[0].self_attn.qkv_proj.weight.shape[0]
        nano_rows = (split.num_nanoheads + 2 * split.num_nano_kv_heads) * split.nanohead_dim
        assert nano_rows / rows == pytest.approx(split.proportion)  # the nanoheads' share of the QKV parameters
    if not learnable_logit_scale:
        assert len(set(counts.values())) == 1, counts  # with the scales, one more scalar per nanohead


def test_logit_scale_is_off_by_default_and_then_changes_nothing():
    config = NanoheadConfig(**{**TINY, "nanohead_proportion": 0.4})
    assert config.learnable_logit_scale is False
    default = make_model()
    assert not any("logit_scale" in name for name, _ in default.named_parameters())
    scaled = make_model(learnable_logit_scale=True)  # scales at their initial exp(0) = 1: the same function
    missing, unexpected = scaled.load_state_dict(default.state_dict(), strict=False)
    assert unexpected == [] and all("log_logit_scale" in name for name in missing)
    input_ids = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(scaled(input_ids).logits, default(input_ids).logits, rtol=0, atol=0)


def _max_nano_logit(model: NanoheadForCausalLM, input_ids: torch.Tensor) -> float:
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(input_ids, output_attentions=True).attentions[0]
    n = model.config.nanohead_split.num_heads
    nano = weights[:, n:]
    # eager softmax weights: the largest logit gap to the row's others is log(max / min) over the causal entries
    lower = torch.ones(nano.shape[-2:], dtype=torch.bool).tril()
    top = nano.masked_fill(~lower, 0).amax(-1)
    bottom = nano.masked_fill(~lower, 1).amin(-1)
    return (top / bottom).log().max().item()


def test_learnable_logit_scale_lets_a_nanohead_logit_exceed_sqrt_d():
    input_ids = ids(1, 12)
    d_n = TINY["nanohead_dim"]
    faithful = make_model()
    assert _max_nano_logit(faithful, input_ids) <= 2 * d_n**0.5 + 1e-4  # logits in [-sqrt(d), sqrt(d)]
    scaled = make_model(learnable_logit_scale=True)
    with torch.no_grad():
        for layer in scaled.model.layers:
            layer.self_attn.log_logit_scale.fill_(math.log(4.0))
    assert _max_nano_logit(scaled, input_ids) > 2 * d_n**0.5
    scaled.train()(input_ids, labels=input_ids).loss.backward()
    assert scaled.model.layers[0].self_attn.log_logit_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_learnable_logit_scale_cached_generation_equals_uncached(cache_implementation):
    model = make_model(learnable_logit_scale=True)
    with torch.no_grad():
        for layer in model.model.layers:
            generator = torch.Generator().manual_seed(layer.self_attn.layer_idx)
            layer.self_attn.log_logit_scale.normal_(0.0, 0.7, generator=generator)
    input_ids = ids(2, 6)
    kwargs = {} if cache_implementation is None else {"cache_implementation": cache_implementation}
    assert_same_generation(greedy(model, input_ids, **kwargs), greedy(model, input_ids, use_cache=False))


# --- the model -------------------------------------------------------------------------------------------------


def reference_gpt_logits(model: NanoheadForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """nanochat's GPT written out with plain tensor ops on `model`'s weights: embedding, norm, blocks of (RoPE +
    QK-norm + GQA causal attention, ReLU² MLP), final norm, untied head, soft-capped logits."""
    config = model.config
    weights = model.state_dict()
    batch, length = input_ids.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    angles = torch.arange(length).float()[:, None] / config.rope_theta ** (torch.arange(0, dim, 2).float() / dim)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rope(x):  # rotate channel pairs (i, i + dim/2)
        x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    future = torch.ones(length, length).triu(1).bool()
    x = norm(weights["model.embed_tokens.weight"][input_ids])
    for layer in range(config.num_hidden_layers):
        w = {name.removeprefix(f"model.layers.{layer}."): t for name, t in weights.items()
             if name.startswith(f"model.layers.{layer}.")}
        h = norm(x)
        w_q, w_k, w_v = w["self_attn.qkv_proj.weight"].split([heads * dim, kv_heads * dim, kv_heads * dim])
        q = norm(rope((h @ w_q.T).view(batch, length, heads, dim)))
        k = norm(rope((h @ w_k.T).view(batch, length, kv_heads, dim)))
        v = (h @ w_v.T).view(batch, length, kv_heads, dim)
        k, v = k.repeat_interleave(heads // kv_heads, dim=2), v.repeat_interleave(heads // kv_heads, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim)
        attention = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", attention, v).reshape(batch, length, -1)
        x = x + y @ w["self_attn.o_proj.weight"].T
        x = x + torch.relu(norm(x) @ w["mlp.up_proj.weight"].T).square() @ w["mlp.down_proj.weight"].T
    logits = norm(x) @ weights["lm_head.weight"].T
    cap = config.final_logit_softcapping
    return cap * torch.tanh(logits / cap)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_proportion_zero_is_the_plain_reference_gpt(kv_heads):
    model = make_model(nanohead_proportion=0.0, num_key_value_heads=kv_heads)
    assert not any("nano" in name for name, _ in model.named_parameters())
    input_ids = ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference_gpt_logits(model, input_ids),
                                   rtol=1e-5, atol=1e-5)


def _attention_inputs_of_o_proj(model, input_ids, position_ids):
    """The concatenated head outputs `(batch, seq, hidden)` entering layer 0's output projection."""
    captured = {}
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: captured.setdefault("heads", args[0].detach().clone())
    )
    with torch.no_grad():
        model(input_ids, position_ids=position_ids)
    hook.remove()
    return captured["heads"]


def test_each_kind_of_head_has_projections_of_its_own():
    """Zeroing the nanoheads' rows of `qkv_proj` (layout [q | k | nano_q | nano_k | v | nano_v]) leaves the normal
    heads' outputs unchanged and silences the nanoheads."""
    model = make_model()
    split = model.config.nanohead_split
    input_ids, positions = ids(2, 9), torch.arange(9)[None]
    before = _attention_inputs_of_o_proj(model, input_ids, positions)
    qk_end = (split.num_heads + split.num_kv_heads) * split.head_dim
    values_start = split.width + split.kv_width
    with torch.no_grad():
        weight = model.model.layers[0].self_attn.qkv_proj.weight
        weight[qk_end:values_start] = 0  # nanohead queries and keys
        weight[values_start + split.num_kv_heads * split.head_dim:] = 0  # nanohead values
    after = _attention_inputs_of_o_proj(model, input_ids, positions)
    torch.testing.assert_close(after[..., :split.normal_width], before[..., :split.normal_width], rtol=0, atol=0)
    assert after[..., split.normal_width:].abs().max() == 0 and before[..., split.normal_width:].abs().max() > 0


def test_rotary_positions_reach_normal_heads_only():
    model = make_model()
    split = model.config.nanohead_split
    input_ids = ids(1, 10)
    contiguous = torch.arange(10)[None]
    spread = (torch.arange(10) * 3 + 5)[None]  # same content, other (non-uniformly shifted) positions
    first = _attention_inputs_of_o_proj(model, input_ids, contiguous)
    second = _attention_inputs_of_o_proj(model, input_ids, spread)
    torch.testing.assert_close(first[..., split.normal_width:], second[..., split.normal_width:], rtol=0, atol=1e-6)
    assert (first[..., :split.normal_width] - second[..., :split.normal_width]).abs().max() > 1e-3


@pytest.mark.parametrize("proportion", [0.0, 0.4])
def test_causal(proportion):
    model = make_model(nanohead_proportion=proportion)
    input_ids = ids(1, 12)
    changed = input_ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 64
    with torch.no_grad():
        before, after = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("nanohead_dim", [2, 3, 4, 5])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cached_generation_equals_uncached_for_tiny_head_dims(nanohead_dim, backend):
    model = make_model(attn_implementation=backend, hidden_size=96, nanohead_dim=nanohead_dim)
    assert model.config.nanohead_split.num_nanoheads > 0
    input_ids = ids(2, 5)
    assert_same_generation(greedy(model, input_ids, use_cache=True), greedy(model, input_ids, use_cache=False))


@pytest.mark.parametrize("hidden_size,proportion,expected", [
    (48, 0.0, (2, 12)),  # no nanoheads: Llama's (num_key_value_heads, hidden / heads)
    (48, 0.4, (4, 6)),  # d = 6: 2 normal KV heads, then 4 nano KV heads x 3 channels packed into 2 slots of 6
    (64, 0.4, (4, 10)),  # d = 10: 2 normal KV heads, then 4 x 3 = 12 nano channels in 2 slots (8 padded)
])
def test_dynamic_cache_is_in_transformers_layout(hidden_size, proportion, expected):
    model = make_model(hidden_size=hidden_size, nanohead_proportion=proportion)
    split = model.config.nanohead_split
    with torch.no_grad():
        cache = model(ids(2, 7), use_cache=True).cache
    assert len(cache.layers) == model.config.num_hidden_layers
    assert tuple(cache.layers[0].keys.shape) == (2, *expected[:1], 7, expected[1])
    assert modeling_nanohead.cache_head_shape(split) == expected
    # the normal heads' slots are their keys; the tail holds the nanohead channels, then zeros
    hidden = model.model.embedding_norm(model.model.embed_tokens(ids(2, 7)))
    attention = model.model.layers[0].self_attn
    qkv = attention.qkv_proj(model.model.layers[0].input_layernorm(hidden))
    n, n_kv, d = split.num_heads, split.num_kv_heads, split.head_dim
    nano_start = (n + n_kv) * d + split.num_nanoheads * split.nanohead_dim
    nano_keys = attention.qk_norm(qkv[..., nano_start:split.width + split.kv_width].unflatten(
        -1, (-1, split.nanohead_dim))).flatten(2)
    tail = cache.layers[0].keys[:, n_kv:].transpose(1, 2).flatten(2)
    torch.testing.assert_close(tail[..., :nano_keys.shape[-1]], nano_keys)
    assert not tail[..., nano_keys.shape[-1]:].any()


@pytest.mark.parametrize("proportion", [0.0, 0.4])
def test_static_cache_generation_equals_uncached(proportion):
    model = make_model(nanohead_proportion=proportion)
    input_ids = ids(3, 6)
    caches = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: caches.append(type(kwargs["cache"])),
                                                 with_kwargs=True)
    static = greedy(model, input_ids, cache_implementation="static")
    hook.remove()
    assert set(caches) == {StaticCache}
    assert_same_generation(static, greedy(model, input_ids, use_cache=False))


def test_static_cache_left_padded_batch_equals_rows_alone():
    model = make_model()
    rows = [ids(1, 7, seed=2)[0], ids(1, 4, seed=3)[0]]
    input_ids = torch.zeros(2, 7, dtype=torch.long)
    attention_mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, 7 - len(row):], attention_mask[i, 7 - len(row):] = row, 1
    batched = greedy(model, input_ids, attention_mask, cache_implementation="static")
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], use_cache=False)
        assert torch.equal(batched.sequences[i, 7:], alone.sequences[0, len(row):])
        for step_batched, step_alone in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_batched[i], step_alone[0], rtol=1e-4, atol=1e-4)


def test_static_cache_decode_step_compiles_without_graph_breaks():
    model = make_model()
    input_ids = ids(2, 6)
    cache = StaticCache(config=model.config, max_cache_len=16)
    step = torch.compile(model.forward, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        logits = model(input_ids, cache=cache, use_cache=True).logits
        sequence = input_ids
        for position in range(6, 9):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
            logits = step(next_token, cache=cache, use_cache=True, position_ids=torch.full((2, 1), position)).logits
            torch.testing.assert_close(logits[:, -1], model(sequence).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(use_cache=False).train()
    input_ids = ids(2, 10)
    model(input_ids, labels=input_ids).loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids, labels=input_ids).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-6, atol=1e-7)


# --- attention backends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "implementation,head_dim,expected",
    [
        ("sdpa", 3, "sdpa"),
        ("eager", 2, "eager"),
        ("flash_attention_2", 64, "flash_attention_2"),
        ("flash_attention_2", 3, "sdpa"),
        ("flash_attention_3", 12, "sdpa"),
        ("kernels-community/flash-attn2", 5, "sdpa"),
        ("flex_attention", 32, "flex_attention"),
        ("flex_attention", 4, "sdpa"),
    ],
)
def test_attention_backend_rules(implementation, head_dim, expected):
    assert modeling_nanohead.attention_backend(implementation, head_dim) == expected


@pytest.mark.parametrize("nanohead_dim", [2, 3, 5])
def test_tiny_heads_padded_for_sdpa_give_the_same_outputs(monkeypatch, nanohead_dim):
    """On CUDA, SDPA gets tiny heads zero-padded to a multiple of 8 (its fused kernels' requirement); forced on the
    CPU here: the nanoheads reach SDPA with 8 channels, the normal heads unpadded, and the outputs are unchanged."""
    model = make_model(hidden_size=64, nanohead_dim=nanohead_dim, nanohead_proportion=0.5)
    split = model.config.nanohead_split
    input_ids = ids(2, 6)
    with torch.no_grad():
        expected_logits = model(input_ids).logits
    expected = greedy(model, input_ids, use_cache=True)
    monkeypatch.setitem(modeling_nanohead.SDPA_PAD_MULTIPLE, "cpu", 8)
    seen = []
    sdpa = modeling_nanohead.ALL_ATTENTION_FUNCTIONS["sdpa"]
    def recording_sdpa(module, query, *args, **kwargs):
        seen.append(query.shape[-1])
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(modeling_nanohead.ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording_sdpa)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert set(seen) == {-(-split.head_dim // 8) * 8, 8}
    assert_same_generation(greedy(model, input_ids, use_cache=True), expected)


def test_forced_fallback_runs_nanoheads_on_eager_and_matches(monkeypatch):
    """Pretend SDPA rejects head dims that are not multiples of 8 (as flash kernels do): the normal heads (dim 8)
    stay on SDPA, the nanoheads (dim 4) fall back to eager attention, and every output is unchanged."""
    config = dict(hidden_size=64, nanohead_dim=4, nanohead_proportion=0.5)
    model = make_model(**config)
    assert (model.config.nanohead_split.head_dim, model.config.nanohead_split.nanohead_dim) == (8, 4)
    input_ids = ids(2, 6)
    rows = [ids(1, 6, seed=2)[0], ids(1, 3, seed=3)[0]]
    padded = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    with torch.no_grad():
        expected_logits = model(input_ids).logits
    expected_cached = greedy(model, input_ids, use_cache=True)
    expected_padded = greedy(model, padded, mask, use_cache=True)

    monkeypatch.setitem(modeling_nanohead.HEAD_DIM_SUPPORT, "sdpa", lambda dim: dim % 8 == 0)
    calls = []
    eager = modeling_nanohead.eager_attention_forward
    def recording_eager(module, query, *args, **kwargs):
        calls.append(query.shape[-1])
        return eager(module, query, *args, **kwargs)

    monkeypatch.setattr(modeling_nanohead, "eager_attention_forward", recording_eager)
    assert model.model.attention_backends() == ("sdpa", "eager")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert calls and set(calls) == {4}, "only the nanoheads run on the fallback"
    assert_same_generation(greedy(model, input_ids, use_cache=True), expected_cached)
    assert_same_generation(greedy(model, padded, mask, use_cache=True), expected_padded)
    assert_same_generation(greedy(model, padded, mask, cache_implementation="static"), expected_padded)


def test_masks_are_built_per_backend(monkeypatch):
    model = make_model(hidden_size=64, nanohead_dim=4, nanohead_proportion=0.5)
    monkeypatch.setitem(modeling_nanohead.HEAD_DIM_SUPPORT, "sdpa", lambda dim: dim % 8 == 0)
    embeds = torch.zeros(2, 5, 64)
    attention_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    masks = model.model._attention_masks(embeds, attention_mask, None, torch.arange(5)[None])
    assert set(masks) == {"sdpa", "eager"}
    assert masks["sdpa"].dtype == torch.bool and masks["eager"].is_floating_point()
    assert torch.equal(masks["sdpa"], masks["eager"] == 0)


# --- the sweep -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [2e5, 1e6, 5e6, 50e6])
def test_parameter_estimator_hits_its_target(target):
    fields = nanohead_sweep.estimate_config(target, vocab_size=2048, aspect_ratio=64, head_dim=32,
                                            kv_group=1, nanohead_dim=3, proportions=nanohead_sweep.PROPORTIONS)
    for proportion in nanohead_sweep.PROPORTIONS:
        config = NanoheadConfig(vocab_size=2048, **fields, nanohead_proportion=proportion, nanohead_dim=3)
        assert abs(nanohead_sweep.count_parameters(config) / target - 1) <= 0.02


def test_token_byte_lengths_count_the_bytes_each_token_holds():
    bpe = train_bpe_tokenizer(["the cat sat on the mat, naïve 😀"] * 20, vocab_size=300)
    lengths = token_byte_lengths(bpe)
    for text in ("the cat", " naïve", " 😀"):
        ids = bpe(text)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text
    assert lengths[bpe.eos_token_id] == 0
    byte_lengths = token_byte_lengths(hf_models.ByteTokenizer())
    assert byte_lengths[:256].tolist() == [1] * 256 and byte_lengths[256:].tolist() == [0, 0, 0]


def test_sweep_cli_micro_run(tmp_path, stories_file):
    report = nanohead_sweep.main([
        "--preset", "smoke", "--proportions", "0,0.4", "--seeds", "1", "--max_steps", "4", "--target_params", "60000",
        "--block_size", "32", "--batch_size", "4", "--max_train_documents", "60", "--vocab_size", "300",
        "--train_file", str(stories_file), "--output_dir", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "nanohead_sweep.json").read_text())
    assert (tmp_path / "nanohead_sweep.png").stat().st_size > 0
    assert [(row["arm"], row["proportion"]) for row in saved["summary"]] == [
        ("faithful", 0.0), ("faithful", 0.4), ("logit_scale", 0.0), ("logit_scale", 0.4)]
    assert len({run["parameters"] for run in saved["runs"] if run["arm"] == "faithful"}) == 1
    assert [gap["proportion"] for gap in saved["arm_gap"]] == [0.0, 0.4]
    assert set(saved["verdicts"]) == {"faithful", "logit_scale"}
    for run in saved["runs"]:
        assert math.isfinite(run["val_bpb"]) and run["val_bpb"] > 0 and run["train_tokens_per_second"] > 0
    assert report["runs"] == saved["runs"]


def test_registered():
    spec = hf_models.get_spec("nanohead_gpt")
    assert spec.model_class is NanoheadForCausalLM and hf_models.NanoheadConfig is NanoheadConfig
    assert hf_models.nanohead.calculate_nanohead_split is calculate_nanohead_split


# --- attention weights -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_config", [False, True])
def test_output_attentions_gives_every_head_in_head_order(by_config):
    model = make_model(attn_implementation="sdpa")
    split = model.config.nanohead_split
    input_ids = ids(2, 6)
    with torch.no_grad():
        plain = model(input_ids).logits
        if by_config:  # transformers' configs accept output_attentions only with eager attention
            model.config._attn_implementation = "eager"
            model.config.output_attentions = True
            outputs = model(input_ids)
        else:
            outputs = model(input_ids, output_attentions=True)
    assert len(outputs.attentions) == model.config.num_hidden_layers
    heads = split.num_heads + split.num_nanoheads
    for weights in outputs.attentions:
        assert weights.shape == (2, heads, 6, 6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, 6))
        assert not weights.triu(1).any()  # causal
    torch.testing.assert_close(outputs.logits, plain, rtol=1e-5, atol=1e-5)
    # head order: the first layer's weights recomputed from its queries and keys, normal heads then nanoheads
    attention = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embedding_norm(model.model.embed_tokens(input_ids)))
    qkv = attention.qkv_proj(hidden)
    n, n_kv, d, d_n = split.num_heads, split.num_kv_heads, split.head_dim, split.nanohead_dim
    nano_start = (n + n_kv) * d
    nano = attention.qk_norm(qkv[..., nano_start:nano_start + (split.num_nanoheads + split.num_nano_kv_heads) * d_n]
                             .unflatten(-1, (-1, d_n)))
    query, key = nano[:, :, :split.num_nanoheads], nano[:, :, split.num_nanoheads:]
    key = key.repeat_interleave(split.num_nanoheads // split.num_nano_kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * d_n**-0.5
    expected = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    torch.testing.assert_close(outputs.attentions[0][:, n:], expected.detach(), rtol=1e-5, atol=1e-6)


def test_generate_returns_attention_weights_with_the_cache():
    model = make_model()
    out = model.generate(ids(1, 4), max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_attentions=True, return_dict_in_generate=True)
    heads = model.config.nanohead_split.num_heads + model.config.nanohead_split.num_nanoheads
    assert [step[0].shape for step in out.attentions] == [(1, heads, 4, 4), (1, heads, 1, 5), (1, heads, 1, 6)]


def _report(bpbs: dict[tuple[str, float], list[float]]) -> dict:
    from benchmarks.harness import mean_and_se

    summary = []
    for (arm, proportion), values in bpbs.items():
        mean, se = mean_and_se(values)
        summary.append({"arm": arm, "proportion": proportion, "seeds": len(values), "val_bpb_mean": mean,
                        "val_bpb_se": se})
    return {"preset": "smoke", "parameters": 1000, "settings": {"max_steps": 5, "batch_size": 2, "block_size": 8},
            "environment": {"device_name": "a CPU", "torch_threads": 1}, "runs": [{"train_seconds": 60.0}] * 6,
            "summary": summary,
            "arm_gap": nanohead_sweep._arm_gap(summary), "verdict": "v"}


def test_card_block_is_generated_from_the_json_figures():
    report = _report({("faithful", 0.0): [1.0, 1.2], ("faithful", 0.4): [1.5, 1.7], ("logit_scale", 0.0): [1.0, 1.0]})
    block = nanohead_sweep.card_block(report, "results/run/x.json")
    # p = 0.4: +0.5 against p = 0, SE hypot(0.1, 0.1) = 0.1414, beyond 2 SE
    assert "| faithful | 0.4 | 2 | 1.6000 ± 0.1000 | +0.5000 ± 0.1414 | yes |" in block
    assert "| faithful | 0.0 | 2 | 1.1000 ± 0.1000 | — | — |" in block
    assert "| 0.0 | -0.1000 ± 0.1000 | no |" in block  # logit_scale - faithful at p = 0
    assert block.startswith("<!-- nanohead_sweep run results: generated from results/run/x.json -->")


def test_the_cards_sweep_figures_are_the_committed_json():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    json_path = root / "model_cards" / "results" / "nanohead_sweep" / "smoke" / "nanohead_sweep.json"
    report = json.loads(json_path.read_text())
    assert len(report["runs"]) == 30 and {row["seeds"] for row in report["summary"]} == {3}
    block = nanohead_sweep.card_block(report, "model_cards/results/nanohead_sweep/smoke/nanohead_sweep.json")
    assert block in (root / "model_cards" / "nanohead_gpt.md").read_text(), \
        "regenerate with: python -m benchmarks.nanohead_sweep card model_cards/results/nanohead_sweep/smoke/nanohead_sweep.json"
