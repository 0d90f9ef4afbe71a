"""Masked diffusion LM (seed 002): config rules, the detached sampler/critic heads (and the original's neighbour bug),
the staged objective, wavefront / bootstrap / critic sampling invariants, bad inputs, head-changing checkpoints,
the CLI's bound metrics and the coherence experiment's CLI. Tiny configs, CPU, fixed seeds; the common battery
(tests/test_common.py) covers the rest."""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForMaskedLM, TrainerCallback, TrainingArguments

from benchmarks import diffusion_plateau, sampler_coherence
from hf_models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionForMaskedLM, MaskedDiffusionLMOutput
from hf_models.masked_diffusion.modeling_masked_diffusion import filled_neighbour, wavefront_fill
from hf_models.masked_diffusion.sampling import TokenSampler
from training import train
from training.common import UsageError
from training.diffusion import (
    DiffusionObjective,
    DiffusionTrainer,
    critic_loss,
    critic_targets,
    diffusion_loss,
    diffusion_losses,
    mask_tokens,
    sample_mask_rates,
    sampler_loss,
)

MASK = 2
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, mask_token_id=MASK)


def make_model(seed: int = 0, **overrides) -> MaskedDiffusionForMaskedLM:
    torch.manual_seed(seed)
    fields = {**TINY, "add_sampler_head": True, "add_critic_head": True, **overrides}
    return MaskedDiffusionForMaskedLM(MaskedDiffusionConfig(**fields)).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def trunk_parameters(model: MaskedDiffusionForMaskedLM) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if not name.startswith(("sampler_head.", "critic_head."))}


@contextmanager
def transformers_warnings():
    """Collect the warnings of transformers' loggers (they do not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, logger = Collect(level=logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# --- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,field", [
    ({"add_sampler_head": True, "attention_type": "causal"}, "attention_type"),
    ({"add_sampler_head": True, "mask_token_id": None}, "mask_token_id"),
    ({"mask_token_id": 64}, "mask_token_id"),
    ({"sampler_min_neighbors_ratio": 0.0}, "sampler_min_neighbors_ratio"),
    ({"start_critic_step": 3, "end_critic_step": 2}, "end_critic_step"),
    ({"attention_type": "local"}, "attention_type"),
])
def test_config_rejects_what_the_seed_forbids(overrides, field):
    with pytest.raises(ValueError, match=field):
        MaskedDiffusionConfig(**{**TINY, **overrides})


def test_a_model_needs_a_mask_token_but_a_bare_config_does_not():
    assert AutoConfig.for_model("masked_diffusion_lm").mask_token_id is None
    with pytest.raises(ValueError, match="mask_token_id is required"):
        MaskedDiffusionForMaskedLM(MaskedDiffusionConfig(**{**TINY, "mask_token_id": None}))


def test_critic_weight_ramps_from_start_to_end():
    config = MaskedDiffusionConfig(**TINY, add_critic_head=True, start_critic_step=4, end_critic_step=7,
                                   critic_alpha=0.5)
    assert [config.critic_weight(step) for step in range(3, 9)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert MaskedDiffusionConfig(**TINY, add_critic_head=True, start_critic_step=2).critic_weight(2) == 0.5


def test_attention_is_bidirectional_or_causal_as_configured():
    x = ids(1, 10)
    changed = x.clone()
    changed[0, 7] = (x[0, 7] + 1) % 61 + 3
    with torch.no_grad():
        for attention_type, earlier_changes in (("bidirectional", True), ("causal", False)):
            model = make_model(attention_type=attention_type, add_sampler_head=False)
            before, after = model(x).logits[0, :7], model(changed).logits[0, :7]
            assert (not torch.allclose(before, after)) == earlier_changes, attention_type


def test_forward_loss_is_the_unshifted_cross_entropy():
    model = make_model()
    x = ids(2, 9)
    labels = x.clone()
    labels[:, ::2] = -100
    with torch.no_grad():
        output = model(x, labels=labels)
    expected = F.cross_entropy(output.logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


# --- sampler and critic heads ---------------------------------------------------------------------------------


def test_sampler_inputs_carry_real_neighbour_embeddings():
    """The original fork wrote neighbours into a copy (chained boolean indexing) and trained on zeros."""
    model = make_model()
    x = torch.tensor([[5, MASK, 7, 9, 11]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding: not a neighbour
    hidden = model(x).last_hidden_state
    inputs = model.sampler_inputs(x, hidden, attention_mask)
    embed = model.model.embed_tokens.weight
    left, middle, right = inputs[0].split(32, dim=-1)
    zero = torch.zeros(32)
    expected_left = [zero, embed[5], zero, embed[7], embed[9]]
    expected_right = [zero, embed[7], embed[9], zero, zero]
    for position in range(5):
        torch.testing.assert_close(left[position], expected_left[position])
        torch.testing.assert_close(right[position], expected_right[position])
    torch.testing.assert_close(middle, hidden[0])
    assert not inputs.requires_grad and hidden.requires_grad
    assert left[3].abs().sum() > 0 and right[1].abs().sum() > 0


def test_auxiliary_losses_leave_the_trunk_gradients_unchanged():
    x = ids(4, 16)
    grads = {}
    for auxiliary in (False, True):
        model = make_model().train()
        total, parts, _ = diffusion_losses(model, x, x, step=0, objective=DiffusionObjective(),
                                           generator=torch.Generator().manual_seed(3), auxiliary=auxiliary)
        total.backward()
        grads[auxiliary] = {name: p.grad.clone() for name, p in trunk_parameters(model).items()}
        if auxiliary:
            assert set(parts) == {"main", "sampler", "critic"}
            for name, parameter in model.named_parameters():
                if name.startswith(("sampler_head.", "critic_head.")):
                    assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        assert torch.equal(grads[False][name], grads[True][name]), name


def test_sampler_training_and_wavefront_use_the_same_head_path():
    model = make_model()
    x = ids(2, 12)
    labels = x.clone()
    noisy, masked = mask_tokens(x, labels, torch.tensor([0.5, 0.5]), MASK, torch.Generator().manual_seed(0))
    hidden = model(noisy).last_hidden_state
    expected = F.cross_entropy(model.sampler_head(model.sampler_inputs(noisy, hidden)[masked]), labels[masked])
    torch.testing.assert_close(sampler_loss(model, noisy, hidden, labels, masked), expected)

    # Greedy wavefront on [a, M, b]: the middle gets the argmax of the same head on the same inputs.
    seq = torch.tensor([[10, MASK, 20]])
    outputs = model(seq)
    filled, _ = wavefront_fill(model, seq, outputs, fillable=seq == MASK, budget=torch.tensor([1]),
                               valid=torch.ones_like(seq, dtype=torch.bool), sample=TokenSampler(0, 1, MASK, None),
                               bootstrap_ratio=0.01)
    logits = model.sampler_logits(model.sampler_inputs(seq, outputs.last_hidden_state))[0, 1]
    logits[MASK] = -math.inf
    assert filled[0, 1] == logits.argmax()
    assert not torch.equal(model.sampler_head.lm_head.weight[:5], model.lm_head.weight[:5])  # its own projection


def test_critic_targets_and_loss_on_a_hand_made_example():
    filled = torch.tensor([[4, 5, 6, 7]])
    truth = torch.tensor([[4, 9, 6, 8]])
    assert critic_targets(filled, truth).tolist() == [[0.0, 1.0, 0.0, 1.0]]

    model = make_model()
    noisy = torch.tensor([[4, MASK, 6, MASK]])
    masked = noisy == MASK
    logits = torch.full((1, 4, 64), -30.0)
    logits[0, 1, 5] = logits[0, 3, 8] = 30.0  # position 1 samples 5 (wrong: truth 9), position 3 samples 8 (right)
    loss = critic_loss(model, noisy, logits, truth, masked)
    hidden = model.model(input_ids=torch.tensor([[4, 5, 6, 8]])).last_hidden_state
    critic = model.critic_logits(hidden)[0]
    expected = F.binary_cross_entropy_with_logits(critic[[1, 3]], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, expected)


# --- the objective --------------------------------------------------------------------------------------------


def test_mask_rates_are_stratified_and_masks_skip_ignored_labels():
    rates = sample_mask_rates(8, 0.01, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    ordered = rates.sort().values
    assert ordered.min() >= 0.01 and ordered.max() < 1
    torch.testing.assert_close(ordered.diff(), torch.full((7,), 0.99 / 8))
    x = ids(2, 50)
    labels = x.clone()
    labels[:, :25] = -100
    noisy, masked = mask_tokens(x, labels, torch.tensor([1.0, 1.0]), MASK)
    assert not masked[:, :25].any() and masked[:, 25:].all()
    assert torch.equal(noisy[:, :25], x[:, :25]) and (noisy[:, 25:] == MASK).all()


def test_elbo_weighting_divides_by_the_rate_and_mean_does_not():
    labels = torch.tensor([[1, 2, 3], [1, 2, 3]])
    masked = torch.tensor([[True, False, False], [True, True, False]])
    logits = torch.zeros(2, 3, 4)  # uniform: every token costs log 4
    rates = torch.tensor([0.25, 0.5])
    ce = math.log(4)
    elbo = diffusion_loss(logits, labels, masked, rates, "elbo")
    torch.testing.assert_close(elbo, torch.tensor((ce / 0.25 + 2 * ce / 0.5) / 6))
    torch.testing.assert_close(diffusion_loss(logits, labels, masked, rates, "mean"), torch.tensor(ce))


def test_main_loss_scores_only_masked_positions_against_the_clean_tokens():
    model = make_model(add_sampler_head=False, add_critic_head=False).train()
    x = ids(2, 24)
    generator = torch.Generator().manual_seed(3)
    _, parts, outputs = diffusion_losses(model, x, None, step=0, objective=DiffusionObjective(),
                                             generator=torch.Generator().manual_seed(3))
    rates = sample_mask_rates(2, 1e-3, device=x.device, generator=generator)
    _, masked = mask_tokens(x, x, rates, MASK, generator)
    assert masked.any() and (~masked).any()
    assert not (x == MASK).any()  # the clean tokens are the targets: the mask token never is one
    logits = outputs.logits.detach().requires_grad_(True)
    diffusion_loss(logits, x, masked, rates, "elbo").backward()
    assert logits.grad[~masked].abs().max() == 0 and logits.grad[masked].abs().sum() > 0
    # the value is the 1/t-weighted CE against the clean token, normalised by every scored position
    ce = F.cross_entropy(outputs.logits[masked], x[masked], reduction="none")
    weights = (1 / rates)[:, None].expand_as(x)[masked]
    torch.testing.assert_close(parts["main"], (ce * weights).sum() / x.numel())


def test_padding_is_invisible_to_every_training_loss():
    """Padded rows (attention_mask 0, label -100): the pad ids change no loss part, so pads are neither attended to
    nor used as sampler neighbours, in the main, sampler and critic passes."""
    model = make_model(start_sampler_step=0, start_critic_step=0).train()
    x = ids(2, 16)
    attention_mask = torch.ones_like(x)
    attention_mask[0, :5] = 0  # left padding
    attention_mask[1, 12:] = 0  # right padding
    labels = x.masked_fill(attention_mask == 0, -100)
    results = []
    for pad_id in (0, 7):
        rows = x.masked_fill(attention_mask == 0, pad_id)
        _, parts, _ = diffusion_losses(model, rows, labels, step=10, objective=DiffusionObjective(),
                                       generator=torch.Generator().manual_seed(4), attention_mask=attention_mask)
        results.append(parts)
    assert set(results[0]) == {"main", "sampler", "critic"}
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_masked_objective_learns_from_bidirectional_context_on_a_toy_task():
    """Regression guard for "the trunk cannot use its context": rows whose tokens all equal the row's first token
    are solved by copying any visible token (left or right). Trained at a fixed 30 % mask rate, the loss at the
    masked positions must fall far below the unigram entropy (log 61) within 150 steps."""
    torch.manual_seed(0)
    model = make_model(add_sampler_head=False, add_critic_head=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = torch.randint(3, 64, (16, 1), generator=generator).expand(16, 16)
        noisy, masked = mask_tokens(x, x, torch.full((16,), 0.3), MASK, generator)
        loss = diffusion_loss(model(input_ids=noisy).logits, x, masked, torch.full((16,), 0.3), "mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * math.log(61), loss.item()


def test_objective_arguments_are_validated():
    assert DiffusionObjective.from_args({"loss_weighting": "mean"}).loss_weighting == "mean"
    with pytest.raises(ValueError, match="unknown objective argument"):
        DiffusionObjective.from_args({"weighting": "elbo"})
    with pytest.raises(ValueError, match="loss_weighting"):
        DiffusionObjective.from_args({"loss_weighting": "sum"})
    with pytest.raises(ValueError, match="min_mask_rate"):
        DiffusionObjective.from_args({"min_mask_rate": 0})
    assert DiffusionObjective().mask_warmup_steps == 0  # the warm-up is off unless asked for (the spec's objective)
    for bad in ({"mask_warmup_steps": -1}, {"mask_warmup_steps": 1.5}, {"mask_warmup_block": True},
                {"mask_warmup_rate": 0}, {"mask_warmup_rate": 1.5}, {"mask_warmup_rate": "0.15"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiffusionObjective.from_args(bad)


def test_mask_warmup_uses_a_fixed_rate_mean_loss_on_sub_blocks_then_the_diffusion_loss():
    model = make_model(add_sampler_head=False, add_critic_head=False)
    x = ids(2, 32)
    objective = DiffusionObjective(mask_warmup_steps=3, mask_warmup_rate=0.25, mask_warmup_block=8)
    assert [objective.in_warmup(step) for step in (0, 2, 3)] == [True, True, False]
    _, parts, outputs = diffusion_losses(model, x, None, step=2, objective=objective,
                                         generator=torch.Generator().manual_seed(5))
    assert outputs.logits.shape[:2] == (8, 8)  # two rows of 32 re-cut into eight rows of 8
    generator = torch.Generator().manual_seed(5)
    rows = x.reshape(8, 8)
    noisy, masked = mask_tokens(rows, rows, torch.full((8,), 0.25), MASK, generator)
    torch.testing.assert_close(outputs.logits, model(input_ids=noisy).logits)
    torch.testing.assert_close(parts["main"], F.cross_entropy(outputs.logits[masked], rows[masked]))
    # after the warm-up: stratified rates, whole rows, the ELBO weighting
    _, parts, outputs = diffusion_losses(model, x, None, step=3, objective=objective,
                                         generator=torch.Generator().manual_seed(5))
    _, reference, _ = diffusion_losses(model, x, None, step=3, objective=DiffusionObjective(),
                                       generator=torch.Generator().manual_seed(5))
    assert outputs.logits.shape[:2] == (2, 32)
    torch.testing.assert_close(parts["main"], reference["main"])
    with pytest.raises(ValueError, match="mask_warmup_block"):
        diffusion_losses(model, ids(2, 30), None, step=0, objective=objective)


@pytest.fixture(scope="module")
def corpus_blocks(stories_file):
    from training.data import DataArguments, load_documents, tokenize_and_pack
    from training.tokenization import train_bpe_tokenizer

    documents = load_documents(DataArguments(train_file=str(stories_file), max_train_documents=300))
    bpe = train_bpe_tokenizer(documents["train"]["text"], vocab_size=300)
    blocks = {name: tokenize_and_pack(documents[name], bpe, 32, split_name=name).blocks
              for name in ("train", "validation")}
    return bpe, documents, blocks


def test_staged_trainer_switches_stages_at_the_configured_steps(corpus_blocks, tmp_path):
    bpe, documents, blocks = corpus_blocks
    torch.manual_seed(0)
    model = MaskedDiffusionForMaskedLM(MaskedDiffusionConfig(
        **{**TINY, "vocab_size": len(bpe), "mask_token_id": bpe.mask_token_id}, add_sampler_head=True,
        add_critic_head=True, start_sampler_step=2, start_critic_step=4, end_critic_step=5))
    sampler_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("sampler_head.")}
    unchanged: dict[int, bool] = {}

    class SamplerWatch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            unchanged[state.global_step] = all(torch.equal(p, sampler_before[n]) for n, p in model.named_parameters()
                                               if n in sampler_before)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, disable_tqdm=True, weight_decay=0.0)
    trainer = DiffusionTrainer.from_cli(model=model, args=args, tokenizer=bpe, train_dataset=blocks["train"],
                                        eval_dataset=blocks["validation"].select(range(16)), objective_args={},
                                        train_texts=documents["train"])
    trainer.add_callback(SamplerWatch())
    trainer.train()
    assert unchanged == {1: True, 2: True, 3: False, 4: False, 5: False, 6: False}  # stage 1: no sampler update
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # A log at step s covers optimizer step s - 1 (counted from 0): stage 2 from step 2, stage 3 from step 4.
    assert [("loss_sampler" in e, "loss_critic" in e) for e in logs] == [(False, False), (False, False)] + \
        [(True, False)] * 2 + [(True, True)] * 2
    for entry in logs:
        weight = model.config.critic_weight(entry["step"] - 1)
        expected = entry["loss_main"] + entry.get("loss_sampler", 0) + weight * entry.get("loss_critic", 0)
        assert entry["loss"] == pytest.approx(expected, abs=2e-3)

    first, second = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    assert first == second and first > 0


def test_unknown_objective_argument_is_a_usage_error(corpus_blocks, tmp_path):
    bpe, documents, blocks = corpus_blocks
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="unknown objective argument"):
        DiffusionTrainer.from_cli(model=make_model(vocab_size=len(bpe)), args=args, tokenizer=bpe,
                                  train_dataset=blocks["train"], eval_dataset=blocks["validation"],
                                  objective_args={"temperature": 1}, train_texts=documents["train"])


def test_trainer_runs_and_logs_the_mask_warmup(corpus_blocks, tmp_path):
    bpe, documents, blocks = corpus_blocks
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    common = dict(model=make_model(vocab_size=len(bpe), mask_token_id=bpe.mask_token_id, add_sampler_head=False,
                                   add_critic_head=False), args=args, tokenizer=bpe,
                  train_dataset=blocks["train"], eval_dataset=blocks["validation"].select(range(8)),
                  train_texts=documents["train"])
    with pytest.raises(ValueError, match="mask_warmup_block=5"):  # the blocks hold 32 tokens
        DiffusionTrainer.from_cli(objective_args={"mask_warmup_steps": 2, "mask_warmup_block": 5}, **common)
    trainer = DiffusionTrainer.from_cli(objective_args={"mask_warmup_steps": 2, "mask_warmup_block": 16}, **common)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["mask_warmup"] for entry in logs] == [1.0, 1.0, 0.0, 0.0]


# --- generation -------------------------------------------------------------------------------------------------


def test_wavefront_fills_only_positions_with_a_filled_neighbour():
    model = make_model()
    a, b, c = 10, 20, 30
    x = torch.tensor([[a, MASK, MASK, b, MASK, MASK, MASK, MASK, c, MASK]])
    outputs = model(x)
    sampler = TokenSampler(1.0, 1.0, MASK, torch.Generator().manual_seed(0))
    valid = torch.ones_like(x, dtype=torch.bool)
    filled, fills = wavefront_fill(model, x, outputs, fillable=x == MASK, budget=torch.tensor([10]), valid=valid,
                                   sample=sampler, bootstrap_ratio=0.01)
    waves = [(kind, chosen[0].nonzero().flatten().tolist()) for kind, chosen in fills]
    assert waves == [("wave", [1, 2, 4, 7, 9]), ("wave", [5, 6])]
    assert not (filled == MASK).any() and torch.equal(filled[x != MASK], x[x != MASK])

    # A budget of 3: the wave's three most confident positions, all with a filled neighbour.
    _, fills = wavefront_fill(model, x, outputs, fillable=x == MASK, budget=torch.tensor([3]), valid=valid,
                              sample=TokenSampler(0, 1.0, MASK, None), bootstrap_ratio=0.01)
    assert len(fills) == 1 and fills[0][1].sum() == 3
    assert set(fills[0][1][0].nonzero().flatten().tolist()) <= {1, 2, 4, 7, 9}


def test_bootstrap_fires_only_without_neighbours_and_fills_the_share_by_confidence():
    model = make_model(sampler_min_neighbors_ratio=0.25)
    out = model.diffusion_generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=12, steps=2, sampler="wavefront",
                                   temperature=0, output_history=True)
    first_step = out.waves[0]
    assert first_step[0][0] == "bootstrap" and all(kind == "wave" for kind, _ in first_step[1:])
    assert all(kind == "wave" for kind, _ in out.waves[1])
    assert first_step[0][1].sum() == math.ceil(0.25 * 12)

    # By confidence: hand-made main logits whose confidences rank positions 4, 7, 1 first.
    x = torch.full((1, 12), MASK)
    logits = torch.zeros(1, 12, 64)
    scores = torch.tensor([0.1, 3.0, 0.5, 2.0, 5.0, 0.2, 1.0, 4.0, 0.0, 0.3, 0.4, 0.6])
    logits[0, :, 10] = 2 * scores
    outputs = MaskedDiffusionLMOutput(logits=logits, last_hidden_state=model(x).last_hidden_state)
    filled, fills = wavefront_fill(model, x, outputs, fillable=x == MASK, budget=torch.tensor([12]),
                                   valid=torch.ones_like(x, dtype=torch.bool), sample=TokenSampler(0, 1, MASK, None),
                                   bootstrap_ratio=0.25)
    assert fills[0][0] == "bootstrap" and fills[0][1][0].nonzero().flatten().tolist() == [1, 4, 7]
    assert (filled[0, [1, 4, 7]] == 10).all() and all(kind == "wave" for kind, _ in fills[1:])
    # Every wave position had a filled neighbour just before its wave.
    state = torch.full((1, 12), MASK)
    for step_fills, after in zip(out.waves, out.history):
        for kind, chosen in step_fills:
            if kind == "wave":
                assert (filled_neighbour(state == MASK, torch.ones_like(state, dtype=torch.bool)) | ~chosen).all()
            state = torch.where(chosen, after, state)

    with_prompt = model.diffusion_generate(ids(1, 3), max_new_tokens=12, steps=3, sampler="wavefront", seed=0,
                                           output_history=True)
    assert all(kind == "wave" for step in with_prompt.waves for kind, _ in step)


@pytest.mark.parametrize("sampler,use_critic", [("naive", False), ("wavefront", False), ("naive", True),
                                                ("wavefront", True)])
def test_generation_keeps_the_prompt_fills_every_mask_and_is_seeded(sampler, use_critic):
    model = make_model()
    prompts = torch.zeros(2, 5, dtype=torch.long)
    attention_mask = torch.zeros(2, 5, dtype=torch.long)
    prompts[0], attention_mask[0] = ids(1, 5, seed=4)[0], 1
    prompts[1, 2:], attention_mask[1, 2:] = ids(1, 3, seed=5)[0], 1
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=10, steps=5, sampler=sampler, use_critic=use_critic,
                  critic_threshold=0.0, top_p=0.9, output_history=True)
    out = model.diffusion_generate(prompts, seed=7, **kwargs)
    again = model.diffusion_generate(prompts, seed=7, **kwargs)
    other = model.diffusion_generate(prompts, seed=8, **kwargs)
    assert out.sequences.shape == (2, 15)
    assert torch.equal(out.sequences, again.sequences) and not torch.equal(out.sequences, other.sequences)
    assert not (out.sequences == MASK).any()
    for state in out.history:
        assert torch.equal(state[:, :5], prompts)  # prompt and padding never change, at any step
    if use_critic:
        assert out.num_remasked.sum() > 0
    else:  # committed tokens are never re-masked or changed
        assert out.num_remasked.sum() == 0
        for before, after in zip(out.history, out.history[1:]):
            kept = before != MASK
            assert torch.equal(after[kept], before[kept])
        masks_left = [int((state == MASK).sum(dim=1)[0]) for state in out.history]
        assert masks_left == [8, 6, 4, 2, 0]


def test_left_padded_row_generates_as_alone_greedily():
    model = make_model()
    row = ids(1, 3, seed=6)
    padded = torch.cat((torch.zeros(1, 2, dtype=torch.long), row), dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    for sampler in ("naive", "wavefront"):
        alone = model.diffusion_generate(row, max_new_tokens=6, steps=3, sampler=sampler, temperature=0)
        batched = model.diffusion_generate(padded, attention_mask=mask, max_new_tokens=6, steps=3, sampler=sampler,
                                           temperature=0)
        assert torch.equal(batched[0, 2:], alone[0]), sampler


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps"),
    ({"steps": 9}, "steps"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 62}, "longer than the context"),
    ({"sampler": "beam"}, "sampler must be one of"),
    ({"top_p": 0.0}, "top_p"),
])
def test_generation_rejects_bad_arguments(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.diffusion_generate(ids(1, 4), **{"max_new_tokens": 8, **kwargs})


def test_generation_rejects_missing_heads_and_masked_prompts():
    plain = make_model(add_sampler_head=False, add_critic_head=False)
    with pytest.raises(ValueError, match="sampler head"):
        plain.diffusion_generate(ids(1, 4), max_new_tokens=4, sampler="wavefront")
    with pytest.raises(ValueError, match="critic head"):
        plain.diffusion_generate(ids(1, 4), max_new_tokens=4, use_critic=True)
    assert plain.diffusion_generate(ids(1, 4), max_new_tokens=4, sampler="auto", seed=0).shape == (1, 8)
    with pytest.raises(ValueError, match="mask token"):
        plain.diffusion_generate(torch.tensor([[5, MASK, 6]]), max_new_tokens=4)


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_save_load_keeps_heads_and_loads_across_head_configs(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "heads")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "heads")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    plain = make_model(seed=1, add_sampler_head=False, add_critic_head=False)
    plain.save_pretrained(tmp_path / "plain")
    with_heads = MaskedDiffusionConfig(**TINY, add_sampler_head=True, add_critic_head=True)
    with transformers_warnings() as records:
        grown = MaskedDiffusionForMaskedLM.from_pretrained(tmp_path / "plain", config=with_heads)
    text = " ".join(record.getMessage() for record in records)
    assert "sampler_head.fc1.weight" in text and "critic_head.weight" in text and "MISSING" in text
    assert torch.equal(grown.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert torch.equal(grown.sampler_head.norm1.weight, torch.ones(32))  # initialised, not left empty
    assert 0.01 < grown.sampler_head.fc1.weight.std() < 0.03 and grown.critic_head.bias.abs().sum() == 0

    without_heads = MaskedDiffusionConfig(**TINY)
    with transformers_warnings() as records:
        shrunk = MaskedDiffusionForMaskedLM.from_pretrained(tmp_path / "heads", config=without_heads)
    assert "UNEXPECTED" in " ".join(record.getMessage() for record in records)
    assert shrunk.sampler_head is None and shrunk.critic_head is None
    x = ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x).logits, model(x).logits, rtol=0, atol=0)


# --- the CLI and the experiment -------------------------------------------------------------------------------


def test_cli_trains_samples_and_reports_bounds(stories_file, tmp_path):
    output_dir = tmp_path / "md"
    train.main([
        "--model_type", "masked_diffusion_lm", "--config_overrides",
        "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=4,max_position_embeddings=32",
        "--train_file", str(stories_file), "--max_train_documents", "200", "--vocab_size", "300",
        "--block_size", "32", "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size",
        "4", "--per_device_eval_batch_size", "32", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
        "--disable_tqdm", "true", "--sample_max_new_tokens", "6", "--seed", "0",
    ])
    metrics = json.loads((output_dir / "all_results.json").read_text())
    assert "eval_perplexity" not in metrics and "eval_bits_per_byte" not in metrics
    assert metrics["eval_perplexity_bound"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0 < metrics["eval_bits_per_byte_bound"] < metrics["eval_bits_per_token_bound"]
    card = (output_dir / "README.md").read_text()
    assert "eval_perplexity_bound" in card and "upper bound" in card and "AutoModelForMaskedLM" in card
    model = AutoModelForMaskedLM.from_pretrained(output_dir)
    assert model.config.mask_token_id == 2 and model.sampler_head is not None and model.critic_head is not None


TINY_COHERENCE = [
    "--set", "max_train_documents=300,vocab_size=300,block_size=24,hidden_size=32,num_hidden_layers=1,"
             "batch_size=4,max_steps=4,reference_max_steps=2,start_sampler_step=1,start_critic_step=2,"
             "end_critic_step=3,max_eval_blocks=4,num_prompts=3,mask_warmup_steps=2,mask_warmup_block=12",
    "--set", "prompt_tokens=4,new_tokens=6,step_counts=[2,6]"]


def test_coherence_experiment_cli_writes_its_report(tmp_path):
    report = sampler_coherence.main([*TINY_COHERENCE, "--set", "seeds=1", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "sampler_coherence.json").read_text())
    assert (tmp_path / "sampler_coherence.png").stat().st_size > 0
    assert [(row["method"], row["steps"], row["threshold"]) for row in saved["rows"]] == [
        *((method, steps, None) for steps in (2, 6) for method in sampler_coherence.METHODS),
        *(("threshold", None, tau) for tau in sampler_coherence.THRESHOLDS)]
    assert all(row["model_calls"] == row["steps"] for row in saved["rows"] if row["steps"])
    assert all(1 <= row["model_calls"] <= 6 for row in saved["rows"])
    assert "left_to_right vs naive" in saved["control_verdict"] and "threshold vs naive" in saved["control_verdict"]
    for row in saved["rows"]:
        assert 0 <= row["unseen_bigram_rate"] <= 1 and row["reference_perplexity"] > 1 and row["tokens_per_second"] > 0
    (run,) = saved["runs"]
    assert saved["se_over"] == "prompts" and "over prompts" in saved["verdict"] and report["verdict"]
    assert run["seed"] == 0 and run["training"]["diffusion_eval_nll_bound"] > 0
    assert [len(row["per_prompt"]["reference_nll"]) for row in run["rows"]] == [3] * len(saved["rows"])
    assert saved["settings"]["mask_warmup_steps"] == 2
    assert [entry["mask_warmup"] for entry in run["training"]["diffusion_log"]] == [1.0, 1.0, 0.0, 0.0]


def test_coherence_experiment_over_seeds_pairs_each_seeds_prompt_means(tmp_path):
    """With two seeds the report's rows are the mean ± SE over the seeds' own rows, and its verdicts pair by seed;
    each seed trained its own models (different validation losses) and keeps its verdicts over prompts."""
    report = sampler_coherence.main([*TINY_COHERENCE, "--set", "seeds=2", "--seed", "3", "--output_dir",
                                     str(tmp_path)])
    assert [run["seed"] for run in report["runs"]] == [3, 4] and report["se_over"] == "seeds"
    first, second = (run["training"]["diffusion_eval_nll_bound"] for run in report["runs"])
    assert first != second
    by_seed = [{(r["method"], r["steps"], r["threshold"]): r for r in run["rows"]} for run in report["runs"]]
    for row in report["rows"]:
        values = [rows[(row["method"], row["steps"], row["threshold"])]["reference_nll"] for rows in by_seed]
        assert row["reference_nll"] == pytest.approx(sum(values) / 2)
        assert row["reference_nll_se"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert row["per_seed"]["reference_nll"] == values and row["seeds"] == 2
    assert "over seeds" in report["verdict"] and "over seeds" in report["control_verdict"]
    assert all("over prompts" in run["verdict"] for run in report["runs"])
    real = [run["real_text"]["reference_nll"] for run in report["runs"]]
    assert report["real_text"]["reference_nll"] == pytest.approx(sum(real) / 2)
    block = sampler_coherence.card_block(report, "model_cards/results/sampler_coherence/x/sampler_coherence.json")
    assert "<!-- sampler_coherence x results" in block and "training seeds 3, 4" in block
    assert f"{report['rows'][0]['reference_nll']:.3f} ± {report['rows'][0]['reference_nll_se']:.3f}" in block

    # the same two seeds run one per process, then merged: the report the single run wrote (timings aside)
    for seed in (3, 4):
        sampler_coherence.main([*TINY_COHERENCE, "--set", "seeds=1", "--seed", str(seed), "--output_dir",
                                str(tmp_path / f"part{seed}")])
    parts = [tmp_path / f"part{seed}" / "sampler_coherence.json" for seed in (4, 3)]
    merged = sampler_coherence.main(["merge", str(tmp_path / "merged"), *map(str, parts)])
    assert json.loads((tmp_path / "merged" / "sampler_coherence.json").read_text())["runs"] == merged["runs"]
    assert [run["seed"] for run in merged["runs"]] == [3, 4] and merged["settings"]["seeds"] == 2
    for key in ("comparisons", "control_comparisons", "verdict", "control_verdict", "se_over"):
        assert merged[key] == report[key], key
    assert [row["reference_nll"] for row in merged["rows"]] == [row["reference_nll"] for row in report["rows"]]
    assert [part["seeds"] for part in merged["merged_from"]] == [[4], [3]]
    assert "2 parts run side by side (seeds 4 and 3)" in sampler_coherence.card_block(merged, "x/y/z.json")
    with pytest.raises(UsageError, match="seed appears in two"):
        sampler_coherence.merge(tmp_path / "again", [parts[0], parts[0]])
    other = json.loads(parts[1].read_text())
    other["settings"]["temperature"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UsageError, match="differ"):
        sampler_coherence.merge(tmp_path / "again", [parts[0], tmp_path / "other.json"])


def test_coherence_over_seeds_and_significance_by_hand():
    def row(method, nll, calls):
        return {"method": method, "steps": 8, "threshold": None, "reference_nll": nll, "unseen_bigram_rate": 0.1,
                "entropy": 2.0, "model_calls": calls}

    rows = sampler_coherence.over_seeds([[row("naive", 3.0, 8), row("wavefront", 4.0, 8)],
                                         [row("naive", 3.2, 8), row("wavefront", 4.4, 9)],
                                         [row("naive", 3.4, 8), row("wavefront", 4.2, 7)]])
    naive, wavefront = rows
    assert naive["reference_nll"] == pytest.approx(3.2) and naive["reference_nll_se"] == pytest.approx(0.2 / 3**0.5)
    assert naive["reference_perplexity"] == pytest.approx(math.exp(3.2)) and wavefront["model_calls_max"] == 9
    diff, se = sampler_coherence.compare(wavefront, naive, "reference_nll", "seeds")
    assert diff == pytest.approx(1.0) and se == pytest.approx(0.2 / 3**0.5)  # paired: differences 1.0, 1.2, 0.8
    lines, summary = sampler_coherence.verdict(rows, [8], "seeds")
    assert lines == [f"8 steps, wavefront vs naive: unseen bigrams +0.0000 ± 0.0000, ref NLL +1.0000 ± {se:.4f} *"]
    assert "raises it in 1" in summary and "lowers the unseen-bigram rate significantly in 0 (raises it in 0)" in summary
    assert not sampler_coherence.significant(0.5, 0.0) and sampler_coherence.significant(-0.5, 0.2)
    with pytest.raises(ValueError, match="different settings"):
        sampler_coherence.over_seeds([[row("naive", 3.0, 8)], [row("wavefront", 3.0, 8)]])


def test_the_cards_sampler_coherence_sections_are_generated_from_their_committed_json():
    """`python -m benchmarks.sampler_coherence card <json>` wrote each section of the card: no hand-typed figure."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    reports = sorted((root / "model_cards" / "results" / "sampler_coherence").glob("*/sampler_coherence.json"))
    assert reports, "no committed sampler_coherence results"
    for path in reports:
        block = sampler_coherence.card_block(json.loads(path.read_text()), path.relative_to(root).as_posix())
        assert block in sampler_coherence.CARD.read_text(), \
            f"regenerate with: python -m benchmarks.sampler_coherence card {path.relative_to(root)}"


def test_plateau_diagnostic_cli_writes_its_curve(tmp_path):
    report = diffusion_plateau.main([
        "--mode", "elbo", "--steps", "3", "--eval_every", "2", "--batch", "2", "--eval_blocks", "2",
        "--mask_warmup_steps", "1", "--mask_warmup_block", "32", "--max_train_documents", "300", "--vocab_size",
        "300", "--output_dir", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "diffusion_plateau.json").read_text())
    assert (tmp_path / "diffusion_plateau.png").stat().st_size > 0
    assert [point["step"] for point in saved["curve"]] == [0, 2, 3] and saved["curve"][-1]["elbo_bound"] > 0
    assert set(saved["curve"][0]["fixed_rate_loss"]) == {"0.15", "0.5", "0.9"}
    assert "warm-up for 1 steps" in report["settings"]["objective"]
    with pytest.raises(UsageError, match="mask_warmup_rate"):
        diffusion_plateau.main(["--mode", "elbo", "--mask_warmup_rate", "0", "--output_dir", str(tmp_path)])


def test_coherence_metrics_on_hand_made_tokens():
    seen = sampler_coherence.bigram_set([[1, 2, 3, 1, 2]])
    metrics = sampler_coherence.text_metrics(1, [2, 2, 5], seen)
    assert metrics == {"unseen_bigram_rate": 2 / 3, "repeat_rate": 1 / 3}
    assert sampler_coherence.distinct_ngrams([[1, 2, 1, 2]], 2) == 2 / 3
    assert sampler_coherence.distinct_ngrams([[1, 2, 1, 2], [1, 2, 1]], 3) == 2 / 3
    assert sampler_coherence.unigram_entropy([4, 4, 7, 9]) == pytest.approx(1.5 * math.log(2))
    assert sampler_coherence.matched_steps(10.2, [8, 16, 32]) == 16 and sampler_coherence.matched_steps(40, [8]) == 8
