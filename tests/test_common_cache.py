"""The common cache and heads battery: every registered architecture gets these checks by registering (tiny
configs, fixed seeds, CPU). They mirror transformers' own model tests: the cache in transformers' layout and
layer classes, static cache ≡ dynamic cache, beam search, `resize_token_embeddings` + save/load, gradient
checkpointing, and the context saved with the tokenizer. Where a check cannot apply, the registry says why
(`task`, `supports_cache`, `hard_context`; the class's `supports_gradient_checkpointing`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, StaticCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from hf_models.modeling_zoo_common import ZooStateCache
from hf_models.registry import ArchitectureSpec
from hf_models.tokenization_byte import ByteTokenizer
from training.push import stage_repository
from training.tokenization import record_model_max_length, train_bpe_tokenizer

from .conftest import CACHED_SPECS, SPECS, assert_same_generation, spec_id, tiny_model
from .test_common import random_ids


def _generate(model, input_ids, new_tokens=6, **kwargs):
    return model.generate(input_ids, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True, **kwargs)


def _first_forward_cache(model, run):
    """The cache each forward pass of `run()` receives (the first one shows what `generate` created)."""
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("cache")),
                                           with_kwargs=True)
    try:
        result = run()
    finally:
        hook.remove()
    return result, seen


# --- the cache in transformers' terms ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_cache_layers_are_transformers_cache_layers(spec: ArchitectureSpec):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 5)
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).cache
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        assert isinstance(layer, (CacheLayerMixin, LinearAttentionCacheLayerMixin))
    # the layer types the config declares give the layer classes transformers itself would build for this model
    reference = DynamicCache(config=model.config)
    if reference.layers:
        for own, built in zip(cache.layers, reference.layers):
            assert isinstance(own, type(built)), (type(own), type(built))
    assert cache.get_seq_length() == 5
    if all(cache.is_linear):  # transformers' state-cache contract (Mamba's): filled states, reorderable by batch
        assert cache.batch_size == 2
        assert cache.has_previous_state()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert cache.batch_size == 2
        assert not cache.is_croppable
        with pytest.raises(ValueError, match="cannot be cropped"):
            cache.crop(1)


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_key_value_caches_are_in_transformers_layout(spec: ArchitectureSpec):
    model = tiny_model(spec)
    with torch.no_grad():
        cache = model(random_ids(spec, 2, 5), use_cache=True).cache
    if not isinstance(cache.layers[0], DynamicLayer):
        assert all(cache.is_linear)  # a state cache (no keys or values): see the test above
        return
    heads, head_dim = model._get_static_cache_init_shape()
    for layer in cache.layers:
        # (batch, num_key_value_heads (+ any extra slots), seq, head_dim)
        assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (2, heads, 5, head_dim)
        assert heads >= model.config.num_key_value_heads


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_the_old_cache_keyword_still_continues_the_cache(spec: ArchitectureSpec):
    """`past_key_values=` (transformers' old name, deprecated until 5.40) continues the cache as `cache=` does."""
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 6)
    with torch.no_grad():
        new = model(input_ids[:, -1:], cache=model(input_ids[:, :-1], use_cache=True).cache, use_cache=True).logits
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = model(input_ids[:, -1:], past_key_values=model(input_ids[:, :-1], use_cache=True).cache,
                        use_cache=True).logits
        full = model(input_ids).logits[:, -1:]
    torch.testing.assert_close(new, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(old, new, rtol=0, atol=0)


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_static_cache_generation_equals_dynamic(spec: ArchitectureSpec):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 5)
    dynamic = _generate(model, input_ids, do_sample=False)
    static, caches = _first_forward_cache(
        model, lambda: _generate(model, input_ids, do_sample=False, cache_implementation="static"))
    # `generate` honoured the request: the first forward pass already holds the cache it created
    assert caches[0] is not None
    if not all(caches[0].is_linear):
        assert isinstance(caches[0], StaticCache)
    assert_same_generation(static, dynamic)


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_beam_search_cached_equals_uncached(spec: ArchitectureSpec):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 5)
    kwargs = dict(num_beams=3, num_return_sequences=2, do_sample=False)
    cached = _generate(model, input_ids, use_cache=True, **kwargs)
    uncached = _generate(model, input_ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (4, 11)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-4, atol=1e-4)
    # with one beam, beam search is greedy search
    one_beam = _generate(model, input_ids, num_beams=1, do_sample=False)
    greedy = _generate(model, input_ids, do_sample=False)
    assert torch.equal(one_beam.sequences, greedy.sequences)


# --- heads over the vocabulary -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_resize_token_embeddings_resizes_every_vocabulary_head_and_saves(spec: ArchitectureSpec, tmp_path):
    model = tiny_model(spec)
    old = model.config.vocab_size
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.resize_token_embeddings(old + 8, mean_resizing=False)
    assert model.config.vocab_size == old + 8
    assert model.get_input_embeddings().weight.shape[0] == old + 8
    assert model.get_output_embeddings().weight.shape[0] == old + 8
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    for name in getattr(model, "_vocabulary_heads", ()):
        head = model.get_submodule(name)
        assert head.weight.shape[0] == old + 8, name
    model.save_pretrained(tmp_path)
    loaded = spec.model_class.from_pretrained(tmp_path).eval()
    input_ids = random_ids(spec, 1, 6)
    input_ids[0, -1] = old + 7  # a new token
    with torch.no_grad():
        expected, actual = model(input_ids).logits, loaded(input_ids).logits
    assert actual.shape[-1] == old + 8
    torch.testing.assert_close(actual, expected)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


# --- gradient checkpointing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gradient_checkpointing_gives_the_same_gradients(spec: ArchitectureSpec):
    model = tiny_model(spec).train()
    if not model.supports_gradient_checkpointing:
        with pytest.raises(ValueError, match="does not support"):
            model.activation_checkpointing_enable()
        return
    input_ids = random_ids(spec, 2, 10)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both runs
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    checkpointed = []
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    for layer in layers:  # count the layers that go through the checkpoint function
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, _f=checkpoint, **kw: checkpointed.append(1) or _f(
            *args, **kw)
    actual = gradients()
    assert len(checkpointed) == len(layers)
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# --- the context saved with the tokenizer --------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_hard_context_is_declared_truthfully(spec: ArchitectureSpec):
    model = tiny_model(spec)
    too_long = random_ids(spec, 1, model.config.max_position_embeddings + 4)
    with torch.no_grad():
        if spec.hard_context:
            with pytest.raises(ValueError, match="max_position_embeddings"):
                model(too_long)
        else:
            model(too_long)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_bpe_tokenizer(["a tiny corpus for a tiny tokenizer"] * 20, vocab_size=300)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_pushed_tokenizer_saves_the_hard_context(spec: ArchitectureSpec, bpe_tokenizer, tmp_path):
    model = tiny_model(spec)
    tokenizer = ByteTokenizer() if spec.tokenizer == "byte" else bpe_tokenizer
    checkpoint, staging = tmp_path / "checkpoint", tmp_path / "staging"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)  # as saved before: the tokenizer's own (unbounded) maximum
    assert AutoTokenizer.from_pretrained(checkpoint).model_max_length > 1e20
    stage_repository(checkpoint, staging)
    saved = AutoTokenizer.from_pretrained(staging).model_max_length
    if spec.hard_context:
        assert saved == model.config.max_position_embeddings
    else:
        assert saved > 1e20  # the model reads any length: nothing to warn about


def test_record_model_max_length_keeps_a_shorter_limit(bpe_tokenizer):
    spec = next(spec for spec in SPECS if spec.hard_context)
    config = spec.make_config(tiny=True)
    bpe_tokenizer.model_max_length = 16
    record_model_max_length(bpe_tokenizer, spec, config)
    assert bpe_tokenizer.model_max_length == 16
    bpe_tokenizer.model_max_length = int(1e30)
    record_model_max_length(bpe_tokenizer, spec, config)
    assert bpe_tokenizer.model_max_length == config.max_position_embeddings


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_batch_selected_cache_continues_each_selected_row(spec: ArchitectureSpec):
    model = tiny_model(spec)
    prompt, step = random_ids(spec, 2, 5), random_ids(spec, 3, 1, seed=4)
    rows = torch.tensor([1, 1, 0])  # a row twice (as beams repeat), rows reordered
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
        cache.batch_select_indices(rows)
        logits = model(step, cache=cache, use_cache=True).logits[:, -1]
        expected = model(torch.cat([prompt[rows], step], dim=1)).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_training_mode_builds_no_state_cache_unless_asked(spec: ArchitectureSpec):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 5)
    with torch.no_grad():
        cache = model(input_ids).cache  # eval mode: the config's use_cache=True
    model.train()
    if isinstance(cache, ZooStateCache):  # preallocated state: none unless asked for
        assert model(input_ids).cache is None, "a training forward pass allocated a decoding state nobody asked for"
        assert isinstance(model(input_ids, use_cache=True).cache, ZooStateCache)
    else:  # a key/value cache (transformers' DynamicCache, as in Llama) holds only the tokens fed, never more
        training_cache = model(input_ids).cache
        assert training_cache is None or training_cache.get_seq_length() == input_ids.shape[1]
