"""Masked diffusion decoders of `hf_models/masked_diffusion/decoding.py`: left-to-right, confidence-threshold and
block-wise decoding with the approximate key/value cache (the trunk's `cache=`). Hand-made logits where the rule
itself is checked, tiny random models for the invariants; CPU, fixed seeds."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.cache_utils import DynamicCache

from benchmarks import diffusion_decode
from hf_models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionForMaskedLM, MaskedDiffusionLMOutput
from training.common import UsageError

MASK = 2
VOCAB = 32
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, mask_token_id=MASK)


def make_model(seed: int = 0, **overrides) -> MaskedDiffusionForMaskedLM:
    torch.manual_seed(seed)
    return MaskedDiffusionForMaskedLM(MaskedDiffusionConfig(**{**TINY, **overrides})).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_logits(model: MaskedDiffusionForMaskedLM, logits_fn) -> MaskedDiffusionForMaskedLM:
    """Replace the model's forward by `logits_fn(input_ids, position_ids) -> (batch, seq, vocab)`."""

    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, **_):
        return MaskedDiffusionLMOutput(logits=logits_fn(input_ids, position_ids))

    model.forward = forward
    return model


def confidence_logits(confidences: list[list[float]], prompt_length: int):
    """Logits giving token 5 the probability `confidences[row][i]` at new position i whatever the input (the rest
    spread evenly over the other non-mask tokens), and a uniform distribution over the prompt."""
    table = torch.zeros(len(confidences), prompt_length + len(confidences[0]), VOCAB)
    for row, values in enumerate(confidences):
        for i, c in enumerate(values):
            probs = torch.full((VOCAB,), (1 - c) / (VOCAB - 2))
            probs[5] = c
            table[row, prompt_length + i] = probs.log()
    table[..., MASK] = float("-inf")
    return lambda input_ids, position_ids: table[torch.arange(len(table))[:, None], position_ids]


def commits(history: tuple[torch.Tensor, ...], start: torch.Tensor, row: int = 0) -> list[set[int]]:
    """Positions of `row` newly filled at each step."""
    previous, steps = start, []
    for state in history:
        steps.append(set(torch.nonzero((previous[row] == MASK) & (state[row] != MASK)).flatten().tolist()))
        previous = state
    return steps


def initial(prompt: torch.Tensor, new: int) -> torch.Tensor:
    return torch.cat((prompt, torch.full((prompt.shape[0], new), MASK)), dim=1)


# --- confidence threshold ---------------------------------------------------------------------------------------


def test_threshold_commits_every_position_above_it_and_at_least_one():
    confidences = [[0.95, 0.3, 0.92, 0.5, 0.2, 0.99], [0.97] * 6]
    model = with_logits(make_model(), confidence_logits(confidences, prompt_length=2))
    prompt = ids(2, 2)
    out = model.diffusion_generate(prompt, max_new_tokens=6, sampler="threshold", threshold=0.9, temperature=0,
                                   output_history=True)
    # above 0.9 at once (new positions 0, 2, 5), then the single most confident left: 0.5, 0.3, 0.2
    assert commits(out.history, initial(prompt, 6)) == [{2, 4, 7}, {5}, {3}, {6}]
    assert commits(out.history, initial(prompt, 6), row=1) == [set(range(2, 8)), set(), set(), set()]
    assert out.num_model_calls.tolist() == [4, 1] and out.num_tokens_processed.tolist() == [4 * 8, 8]
    assert out.sequences[:, 2:].tolist() == [[5] * 6] * 2
    blocks = model.diffusion_generate(prompt, max_new_tokens=6, sampler="threshold", threshold=0.9, temperature=0,
                                      block_size=3, output_history=True)
    assert commits(blocks.history, initial(prompt, 6)) == [{2, 4}, {3}, {7}, {5}, {6}]
    assert blocks.num_model_calls.tolist() == [5, 2]


def test_threshold_above_one_is_one_token_per_step_like_naive():
    """tau > 1 never passes: the most confident draw each step, i.e. naive with steps = max_new_tokens (same draws
    from the same generator, so the same tokens)."""
    model, prompt = make_model(), ids(2, 4)
    out = model.diffusion_generate(prompt, max_new_tokens=8, sampler="threshold", threshold=1.5, seed=3,
                                   output_history=True)
    assert [len(step) for step in commits(out.history, initial(prompt, 8))] == [1] * 8
    assert out.num_model_calls.tolist() == [8, 8]
    naive = model.diffusion_generate(prompt, max_new_tokens=8, steps=8, sampler="naive", seed=3)
    assert torch.equal(out.sequences, naive)


# --- left to right ----------------------------------------------------------------------------------------------


def test_left_to_right_fills_in_order_and_follows_the_argmax_chain():
    """A head whose distribution at position i is peaked on `(token at i-1) + 1` (sampled at temperature 1)."""

    def chain(input_ids, position_ids):
        left = torch.cat((input_ids[:, :1], input_ids[:, :-1]), dim=1)
        return 50.0 * torch.nn.functional.one_hot((left + 1) % VOCAB, VOCAB).float()

    model = with_logits(make_model(), chain)
    prompt = torch.tensor([[7, 9, 11]])
    out = model.diffusion_generate(prompt, max_new_tokens=6, sampler="left_to_right", temperature=1.0, top_p=0.9,
                                   seed=0, output_history=True)
    assert commits(out.history, initial(prompt, 6)) == [{3}, {4}, {5}, {6}, {7}, {8}]
    assert out.sequences[0].tolist() == [7, 9, 11, 12, 13, 14, 15, 16, 17]
    assert out.num_model_calls.tolist() == [6]
    two_per_step = model.diffusion_generate(prompt, max_new_tokens=6, steps=3, sampler="left_to_right", seed=0,
                                            output_history=True)
    assert commits(two_per_step.history, initial(prompt, 6)) == [{3, 4}, {5, 6}, {7, 8}]


# --- blocks and the cache ---------------------------------------------------------------------------------------


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    prompts = ids(2, 5)
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = 0, 0
    return prompts, mask


def block_logits(model, x, valid, start, end, context_from=None):
    """The full pass's logits on [start, end) and the block pass's against the keys/values outside [start, end) of
    a full pass on `context_from` (default `x`)."""
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
    full_cache = DynamicCache()
    model(input_ids=x if context_from is None else context_from, attention_mask=valid, position_ids=positions,
          cache=full_cache)
    full = model(input_ids=x, attention_mask=valid, position_ids=positions).logits[:, start:end]
    outside = torch.cat((torch.arange(start), torch.arange(end, x.shape[1])))
    context = DynamicCache(ddp_cache_data=[(k[:, :, outside], v[:, :, outside]) for k, v, _ in full_cache])
    block = model(input_ids=x[:, start:end], position_ids=positions[:, start:end], cache=context,
                  attention_mask=torch.cat((valid[:, outside], valid[:, start:end]), dim=1)).logits
    return full, block


def padded_state() -> tuple[torch.Tensor, torch.Tensor]:
    prompts, mask = left_padded()
    x = torch.cat((prompts, torch.full((2, 12), MASK)), dim=1)
    x[:, 9] = 4
    return x, torch.cat((mask, torch.ones(2, 12, dtype=torch.long)), dim=1)


def test_cached_trunk_pass_equals_the_full_pass_on_the_active_block():
    """The mechanism: keys/values of the positions outside [9, 13) from a full pass, then the block alone against
    them, give the full pass's logits (a left-padded batch; the cached keys are not a prefix)."""
    x, valid = padded_state()
    full, block = block_logits(make_model(), x, valid, 9, 13)
    torch.testing.assert_close(block, full, rtol=1e-5, atol=1e-5)


def test_stale_cache_is_exact_at_layer_zero_only():
    """What is approximate: after the block changes (a token committed at 10), the kept keys/values of layers >= 1
    are stale, layer 0's are not (they depend only on the unchanged tokens outside the block). So a 1-layer trunk
    is still exact (and decodes identically with the reused cache), a 2-layer one is not."""
    x, valid = padded_state()
    before = x.clone()
    x[:, 10] = 7
    full, block = block_logits(make_model(num_hidden_layers=1), x, valid, 9, 13, context_from=before)
    torch.testing.assert_close(block, full, rtol=1e-5, atol=1e-5)
    full, block = block_logits(make_model(), x, valid, 9, 13, context_from=before)
    assert (block - full).abs().max() > 1e-4
    prompts, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, steps=12, sampler="naive", block_size=4, temperature=0)
    one_layer = make_model(num_hidden_layers=1, initializer_range=0.2)
    assert torch.equal(one_layer.diffusion_generate(prompts, use_prefix_cache=True, **kwargs),
                       one_layer.diffusion_generate(prompts, **kwargs))


@pytest.mark.parametrize("sampler,steps", [("threshold", None), ("naive", 6)])
def test_cache_refreshed_every_step_equals_the_uncached_block_decoder(sampler, steps):
    model = make_model()
    prompts, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, steps=steps, sampler=sampler, block_size=4, seed=5,
                  return_dict_in_generate=True, **({"threshold": 0.2} if sampler == "threshold" else {}))
    uncached = model.diffusion_generate(prompts, **kwargs)
    refreshed = model.diffusion_generate(prompts, use_prefix_cache=True, cache_refresh_every=1, **kwargs)
    assert torch.equal(refreshed.sequences, uncached.sequences)
    assert torch.equal(refreshed.num_model_calls, uncached.num_model_calls)


def test_cached_run_feeds_only_the_active_block_after_each_blocks_first_step():
    model = make_model()
    fed = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    prompt = ids(1, 4)
    out = model.diffusion_generate(prompt, max_new_tokens=12, steps=6, sampler="naive", block_size=4,
                                   use_prefix_cache=True, seed=0, return_dict_in_generate=True)
    assert fed == [16, 4] * 3  # 3 blocks x 2 steps: the whole sequence, then the block
    assert out.num_model_calls.tolist() == [6] and out.num_tokens_processed.tolist() == [sum(fed)]
    fed.clear()
    every_other = model.diffusion_generate(prompt, max_new_tokens=12, steps=12, sampler="naive", block_size=4,
                                           use_prefix_cache=True, cache_refresh_every=2, seed=0,
                                           return_dict_in_generate=True)
    assert fed == [16, 4, 16, 4] * 3 and every_other.num_tokens_processed.tolist() == [sum(fed)]


# --- invariants -------------------------------------------------------------------------------------------------


DECODERS = [
    dict(sampler="left_to_right"),
    dict(sampler="left_to_right", steps=4),
    dict(sampler="threshold", threshold=0.05),
    dict(sampler="threshold", block_size=4, use_prefix_cache=True),
    dict(sampler="naive", block_size=4, steps=6, use_prefix_cache=True),
]


@pytest.mark.parametrize("options", DECODERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_prompt_kept_no_mask_left_and_seed_reproduces(options):
    model = make_model()
    prompts, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, **options)
    out = model.diffusion_generate(prompts, seed=7, **kwargs)
    assert torch.equal(out[:, :5], prompts)
    assert not bool((out == MASK).any())
    assert torch.equal(model.diffusion_generate(prompts, seed=7, **kwargs), out)
    assert not torch.equal(model.diffusion_generate(prompts, seed=8, **kwargs), out)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="threshold", steps=4), "leave `steps` unset"),
    (dict(sampler="threshold", threshold=0.0), "threshold must be a positive"),
    (dict(sampler="naive", threshold=0.5), "only applies to sampler='threshold'"),
    (dict(sampler="naive", block_size=5), "block_size must be a positive integer dividing"),
    (dict(sampler="naive", block_size=4, steps=3), "multiple of the 2 blocks"),
    (dict(sampler="left_to_right", block_size=4), "apply to the samplers"),
    (dict(sampler="wavefront", use_prefix_cache=True), "apply to the samplers"),
    (dict(sampler="naive", cache_refresh_every=2), "only applies with use_prefix_cache"),
    (dict(sampler="naive", use_prefix_cache=True, cache_refresh_every=0), "cache_refresh_every must be"),
    (dict(sampler="threshold", use_critic=True), "use_critic applies to"),
])
def test_decoding_options_are_validated(kwargs, message):
    model = make_model(add_sampler_head=True, add_critic_head=True)
    with pytest.raises(ValueError, match=message):
        model.diffusion_generate(ids(1, 3), max_new_tokens=8, **kwargs)


def test_causal_trunk_refuses_the_cache():
    model = make_model(attention_type="causal")
    with pytest.raises(ValueError, match="attention_type='bidirectional'"):
        model.diffusion_generate(ids(1, 3), max_new_tokens=8, sampler="naive", use_prefix_cache=True)


# --- the decode benchmark ---------------------------------------------------------------------------------------


def test_decode_benchmark_cli_writes_its_report(tmp_path):
    report = diffusion_decode.main([
        "--max_train_documents", "300", "--vocab_size", "300", "--block_size", "24", "--hidden_size", "32",
        "--num_hidden_layers", "1", "--batch_size", "4", "--max_steps", "4", "--reference_max_steps", "2",
        "--start_sampler_step", "1", "--start_critic_step", "2", "--end_critic_step", "3", "--max_eval_blocks", "4",
        "--num_prompts", "3", "--mask_warmup_steps", "2", "--mask_warmup_block", "12", "--prompt_tokens", "4",
        "--new_tokens", "8", "--decode_block_size", "4", "--thresholds", "0.5", "--output_dir", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "diffusion_decode.json").read_text())
    assert [row["method"] for row in saved["rows"]] == [
        "llama greedy (KV cache)", "naive, 1 token/step", "left-to-right", "threshold 0.5",
        "threshold 0.5, blocks of 4", "threshold 0.5, blocks of 4, cache"]
    cached = saved["rows"][-1]
    # 1 layer: the reused cache is exact (layer 0), so greedy decoding changes no token
    assert cached["cache_tokens_changed"] == 0 and cached["cache_nll_change"] == 0
    assert cached["positions_processed_per_token"] < saved["rows"][-2]["positions_processed_per_token"]
    assert all(row["tokens_per_second"] > 0 and row["reference_perplexity"] > 1 for row in saved["rows"])
    assert saved["training"]["scorer_seed"] == 1 and report["verdict"].startswith("Llama greedy")
    with pytest.raises(UsageError, match="decode_block_size"):
        diffusion_decode.main(["--decode_block_size", "5", "--output_dir", str(tmp_path)])


def test_causal_trunk_with_a_prefix_cache_equals_the_full_pass():
    """The causal variant of the trunk: a cache of positions [0, 5) is an exact prefix cache."""
    model, x = make_model(attention_type="causal"), ids(2, 9)
    cache = DynamicCache()
    model(input_ids=x[:, :5], cache=cache)
    torch.testing.assert_close(model(input_ids=x[:, 5:], cache=cache).logits, model(input_ids=x).logits[:, 5:],
                               rtol=1e-5, atol=1e-5)
