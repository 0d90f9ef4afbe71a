"""The Toeplitz mixer's recurrent decoding (`decode_mode="recurrent"`, issue 18): the modal fit, exactness on kernels
that are sums of modes beyond the window (every variant, both schedules, left padding, multi-token continuation),
a constant-size state, refitting after a weight change, one compiled graph, and the config checks."""

from __future__ import annotations

import math

import pytest
import torch

from hf_models import ToeplitzMixerConfig, ToeplitzMixerForCausalLM
from hf_models.toeplitz_mixer.recurrent_toeplitz_mixer import ToeplitzRecurrentCache, fit_modal_kernel
from tests.test_toeplitz_mixer import (
    VARIANTS,
    _decode_logits,
    _greedy,
    _left_padded,
    check_compiled_decode_is_one_graph,
    ids,
)

LENGTH = 32


def modal_kernels(heads: int, window: int, modes: int, seed: int) -> torch.Tensor:
    """`(heads, LENGTH)` kernels: arbitrary first `window` taps (plus 2 at lag 0, so the mean normaliser stays away
    from 0), then exactly `Re Σ_n r_n λ_n^j` with `modes` random decaying modes."""
    generator = torch.Generator().manual_seed(seed)
    lags = torch.arange(LENGTH - window, dtype=torch.float64)
    kernels = torch.randn(heads, LENGTH, generator=generator, dtype=torch.float64) * 0.3
    for h in range(heads):
        radius = 0.5 + 0.45 * torch.rand(modes, generator=generator, dtype=torch.float64)
        angle = math.pi * torch.rand(modes, generator=generator, dtype=torch.float64)
        poles = torch.polar(radius, angle)
        residues = torch.complex(torch.randn(modes, generator=generator, dtype=torch.float64),
                                 torch.randn(modes, generator=generator, dtype=torch.float64))
        kernels[h, window:] = (residues[None] * poles[None] ** lags[:, None]).real.sum(1)
    kernels[:, 0] += 2.0
    return kernels


def modal_model(window: int = 4, modes: int = 3, **overrides) -> ToeplitzMixerForCausalLM:
    """A tiny model (identity kernels) whose every head's kernel is `modal_kernels(...)`: recurrent decoding with
    `recurrent_state_size >= modes` must reproduce exact decoding."""
    fields = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_heads=4, intermediate_size=32,
                  max_position_embeddings=LENGTH, dropout=0.0, kernel_param="identity",
                  recurrent_state_size=modes + 1, recurrent_window=window)
    fields.update(overrides)
    torch.manual_seed(0)
    model = ToeplitzMixerForCausalLM(ToeplitzMixerConfig(**fields)).eval()
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mixer.kernel_weight.copy_(modal_kernels(4, window, modes, seed=index).float())
            layer.mixer.position_bias.normal_(0, 0.3)
    return model


def test_the_fit_recovers_modes_and_improves_with_the_state_size():
    """A kernel that is 3 modes beyond a 5-tap window is fitted to rounding; a random kernel's error falls as N grows
    and the window taps are kept exactly."""
    kernels = modal_kernels(heads=2, window=5, modes=3, seed=3)
    fit = fit_modal_kernel(kernels, state_size=3, window=5)
    assert fit.relative_error.max() < 1e-8
    assert torch.equal(fit.window_kernel, kernels[:, :5])
    assert (fit.poles.abs() <= 1).all()
    noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = [fit_modal_kernel(noise, state_size=n, window=4).relative_error.mean().item() for n in (2, 8, 24)]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window", [0, 4])
def test_recurrent_decoding_is_exact_on_modal_kernels(variant, window):
    """Teacher-forced, one token at a time after a 5-token prompt, left-padded batch, both head schedules: the
    recurrent steps give the uncached forward's logits; greedy `generate` gives exact decoding's tokens."""
    model = modal_model(window=window, **VARIANTS[variant])
    input_ids, mask = _left_padded([ids(1, 20, seed=2)[0], ids(1, 14, seed=3)[0]])
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask).logits[:, 5:]
    exact = _greedy(model, input_ids[:, :8], mask[:, :8], new_tokens=10)
    model.config.decode_mode = "recurrent"
    for parallel in (True, False):
        model.config.parallel_heads = parallel
        logits, cache = _decode_logits(model, input_ids, mask, prompt=5)
        assert isinstance(cache, ToeplitzRecurrentCache)
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    recurrent = _greedy(model, input_ids[:, :8], mask[:, :8], new_tokens=10)
    assert torch.equal(recurrent.sequences, exact.sequences)


def test_a_multi_token_continuation_steps_through_the_recurrence():
    """A second chunk of several tokens into a filled recurrent cache equals the uncached forward."""
    model = modal_model(decode_mode="recurrent")
    input_ids = ids(2, 20)
    with torch.no_grad():
        full = model(input_ids).logits[:, 7:]
        cache = model(input_ids[:, :7], use_cache=True).cache
        chunk = model(input_ids[:, 7:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(chunk, full, rtol=1e-4, atol=1e-4)


def test_sliding_recompute_refills_a_recurrent_cache_past_the_context():
    """Under `context_overflow="sliding_recompute"` a recurrent cache re-reads the last S tokens once full (an exact
    prefill into the reset state): on modal kernels greedy decoding past the context equals uncached decoding."""
    model = modal_model(decode_mode="recurrent", context_overflow="sliding_recompute")
    input_ids, mask = _left_padded([ids(1, 28, seed=5)[0], ids(1, 21, seed=6)[0]])
    cached = _greedy(model, input_ids, mask, new_tokens=10)
    uncached = _greedy(model, input_ids, mask, new_tokens=10, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-4)


def test_the_recurrent_state_does_not_grow_with_the_context():
    """Apart from layer 0's token ids and row positions, no state tensor scales with `max_position_embeddings`."""
    def state_elements(length: int) -> int:
        config = ToeplitzMixerConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_heads=4,
                                     intermediate_size=32, max_position_embeddings=length, decode_mode="recurrent")
        cache = ToeplitzRecurrentCache(config, batch_size=2)
        return sum(tensor.numel() for layer in cache.layers for name, tensor in layer.states.items()
                   if name != "token_ids")

    assert state_elements(64) == state_elements(4096) == 2 * 2 * 16 * (16 + 2 * 16) + 2


def test_the_fit_follows_the_weights():
    """An in-place weight change (an optimiser step, `load_state_dict`) refits the modes; unchanged weights reuse
    the fit."""
    model = modal_model()
    mixer = model.model.layers[0].mixer
    first = mixer.modal_fit()
    assert mixer.modal_fit() is first
    with torch.no_grad():
        mixer.kernel_weight.mul_(2.0)
    second = mixer.modal_fit()
    assert second is not first
    torch.testing.assert_close(second.residues, 2 * first.residues, rtol=1e-6, atol=1e-9)


def test_the_recurrent_step_compiles_to_one_graph_without_breaks():
    """Under `torch.compile(fullgraph=True)` every recurrent decode step reuses one graph and gives the uncached
    forward's logits (after an eager prefill, which fits the modes)."""
    cache = check_compiled_decode_is_one_graph(modal_model(decode_mode="recurrent"), prompt=4, tolerance=1e-4)
    assert isinstance(cache, ToeplitzRecurrentCache)


@pytest.mark.parametrize(
    "overrides,field",
    [({"decode_mode": "modal"}, "decode_mode"), ({"recurrent_state_size": 0}, "recurrent_state_size"),
     ({"recurrent_window": -1}, "recurrent_window"),
     ({"decode_mode": "recurrent", "recurrent_window": 32, "max_position_embeddings": 32}, "recurrent_window")],
)
def test_bad_recurrent_configs_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ToeplitzMixerConfig(**overrides)


def test_benchmark_micro_run_and_the_cards_figures_are_the_committed_json(tmp_path, stories_file):
    """`benchmarks.toeplitz_recurrent` on a tiny saved model: every setting gets a row, exact decoding's rows have
    no speed-up, the KL is non-negative; and the card's section is what the committed JSON generates."""
    import json
    from pathlib import Path

    from benchmarks import toeplitz_recurrent
    from training.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(stories_file.read_text().splitlines()[:400], vocab_size=300)
    model = ToeplitzMixerForCausalLM(ToeplitzMixerConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_heads=2, intermediate_size=16,
        max_position_embeddings=64, dropout=0.0)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    report = toeplitz_recurrent.run(toeplitz_recurrent.build_parser().parse_args([
        "--model", str(tmp_path / "model"), "--heldout_file", str(stories_file), "--windows", "0,4",
        "--state_sizes", "2,8", "--prompt_tokens", "8", "--greedy_tokens", "4", "--max_windows", "2",
        "--contexts", "16,48", "--speed_setting", "4,2", "--new_tokens", "4", "--compile", "--backend", "eager",
        "--output_dir", str(tmp_path / "out")]))
    assert [(row["window"], row["state_size"]) for row in report["quality"]] == [(0, 2), (0, 8), (4, 2), (4, 8)]
    assert all(row["kl"] >= -1e-6 and 0 <= row["top1_agreement"] <= 1 for row in report["quality"])
    assert [(row["context"], row["path"], row["decode_mode"]) for row in report["speed"]] == [
        (context, path, mode) for context in (16, 48) for path in ("eager", "compiled")
        for mode in ("exact", "recurrent")]
    assert all(("speedup_vs_exact" in row) == (row["decode_mode"] == "recurrent") for row in report["speed"])
    assert (tmp_path / "out" / "toeplitz_recurrent.png").stat().st_size > 0

    root = Path(__file__).resolve().parents[1]
    committed = root / "model_cards" / "results" / "toeplitz_recurrent" / "smoke" / "toeplitz_recurrent.json"
    block = toeplitz_recurrent.card_block(json.loads(committed.read_text()),
                                          committed.relative_to(root).as_posix())
    assert block in (root / "model_cards" / "toeplitz_mixer.md").read_text(), \
        f"regenerate with: python -m benchmarks.toeplitz_recurrent card {committed.relative_to(root)}"
