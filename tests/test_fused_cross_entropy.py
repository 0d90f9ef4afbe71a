"""The fused LM head + soft-cap + cross-entropy (`hf_models.fused_cross_entropy`) against the plain path in float64:
loss and both gradients, with ignored positions, a chunk size that does not divide the positions, the Trainer's
`num_items_in_batch` and pre-shifted labels; and Nanohead's `loss_chunk_size` switch. Then the fused soft-cap and
loss on kept logits (`softcapped_logits_and_loss`, Nanohead's default training path on a CPU), the same way; and
the chunked cross-entropy every zoo LM's `labels` loss takes on a CPU (`modeling_zoo_common.zoo_causal_lm_loss`)
against transformers' `ForCausalLMLoss`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_models import fused_cross_entropy, modeling_zoo_common
from hf_models.fused_cross_entropy import linear_cross_entropy, softcapped_logits_and_loss
from hf_models.nanohead import NanoheadConfig, NanoheadForCausalLM

torch.set_default_dtype(torch.float32)


def inputs(seed: int = 0, batch: int = 2, seq: int = 9, hidden: int = 8, vocab: int = 37):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, 3] = labels[1, 0] = -100
    return h, w, labels


def plain_loss(h, w, labels, softcap=None, denominator=None):
    logits = h @ w.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, w.shape[0]), targets, ignore_index=-100, reduction="sum")
    return total / (denominator if denominator is not None else (targets != -100).sum())


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("denominator", [None, 11])
def test_loss_and_gradients_equal_the_plain_cross_entropy(softcap, denominator):
    h, w, labels = inputs()
    expected = plain_loss(h, w, labels, softcap, denominator)
    grad_h, grad_w = torch.autograd.grad(expected, (h, w))
    # 18 positions in chunks of 4: the last chunk is partial
    fused = linear_cross_entropy(h, w, labels, softcap=softcap, chunk_size=4, num_items_in_batch=denominator)
    assert fused.item() == pytest.approx(expected.item(), rel=1e-12)
    fused_h, fused_w = torch.autograd.grad(fused, (h, w))
    torch.testing.assert_close(fused_h, grad_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_w, grad_w, rtol=1e-10, atol=1e-12)


def test_the_backward_scales_by_the_incoming_gradient_and_no_grad_gives_the_same_loss():
    h, w, labels = inputs(1)
    (3.0 * plain_loss(h, w, labels, 2.0)).backward()
    grad_h, grad_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (3.0 * linear_cross_entropy(h, w, labels, softcap=2.0, chunk_size=5)).backward()
    torch.testing.assert_close(h.grad, grad_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, grad_w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, labels, softcap=2.0).item() == pytest.approx(
            plain_loss(h, w, labels, 2.0).item(), rel=1e-12)


def test_shift_labels_replace_labels_and_a_custom_ignore_index_is_skipped():
    h, w, labels = inputs(2)
    expected = plain_loss(h, w, labels)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    assert linear_cross_entropy(h, w, shift_labels=shifted).item() == pytest.approx(expected.item(), rel=1e-12)
    custom = torch.where(labels == -100, 7, labels)
    clean = labels.clone()
    clean[labels == 7] = -100  # label 7 is now "ignored" in both
    assert linear_cross_entropy(h, w, torch.where(clean == -100, 7, clean), ignore_index=7).item() == \
        pytest.approx(plain_loss(h, w, clean).item(), rel=1e-12)
    assert not torch.equal(custom, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, labels, chunk_size=0)


def nanohead_pair(tie: bool):
    fields = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, nanohead_dim=3, nanohead_proportion=0.4, max_position_embeddings=64,
                  final_logit_softcapping=3.0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    plain = NanoheadForCausalLM(NanoheadConfig(**fields)).double().train()
    fused = NanoheadForCausalLM(NanoheadConfig(**fields, loss_chunk_size=5)).double().train()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.parametrize("tie", [False, True])
def test_nanohead_fused_loss_equals_the_plain_path_and_drops_logits_only_in_training(tie):
    plain, fused = nanohead_pair(tie)
    input_ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[0, :4] = -100
    out_plain, out_fused = plain(input_ids, labels=labels), fused(input_ids, labels=labels)
    assert out_fused.logits is None and out_plain.logits is not None
    # the plain path rounds its logits to float32 (the exact float64 match is the function's test above)
    assert out_fused.loss.item() == pytest.approx(out_plain.loss.item(), rel=1e-6)
    out_plain.loss.backward()
    out_fused.loss.backward()
    plain_grads = dict(plain.named_parameters())
    for name, parameter in fused.named_parameters():  # float32 summation order: a few ulps of the gradient's scale
        expected = plain_grads[name].grad
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(),
                                   msg=name)
    fused.eval()
    with torch.no_grad():
        evaluated = fused(input_ids, labels=labels)
    assert evaluated.logits.shape == (2, 10, 64)
    # the same float32 logits; the training path's loss (fused with the soft-cap) sums in another order
    assert evaluated.loss.item() == pytest.approx(out_plain.loss.item(), rel=1e-6)


def test_the_operator_passes_torch_library_checks():
    """Schema, fake (meta) kernel and autograd registration of `hf_zoo::linear_cross_entropy`, as
    `torch.library.opcheck` tests custom operators."""
    h, w, labels = inputs()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    torch.library.opcheck(torch.ops.hf_zoo.linear_cross_entropy.default,
                          (h.reshape(-1, 8), w, targets, 2.0, 4, torch.tensor(11), True, True))


def test_a_compiled_training_step_keeps_one_graph_and_the_eager_loss_and_gradients():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    _, fused = nanohead_pair(tie=False)
    input_ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    eager = fused(input_ids, labels=input_ids).loss
    eager.backward()
    expected = {name: p.grad.clone() for name, p in fused.named_parameters()}
    fused.zero_grad()
    counter = CompileCounterWithBackend("aot_eager")  # through AOT autograd: the fake kernel and the backward
    compiled = torch.compile(lambda ids: fused(ids, labels=ids).loss, backend=counter, fullgraph=True)(input_ids)
    compiled.backward()
    assert counter.frame_count == 1
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-12)
    for name, parameter in fused.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], msg=name)
    torch._dynamo.reset()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows, so that 18 positions end in a partial chunk."""
    for module in (modeling_zoo_common, fused_cross_entropy):
        monkeypatch.setattr(module, "LOSS_CHUNK", 4)


@pytest.mark.parametrize("denominator", [None, 11])
@pytest.mark.parametrize("uses", ["loss", "logits", "both"])
def test_softcapped_logits_and_loss_equal_the_plain_soft_cap_and_cross_entropy(small_chunks, denominator, uses):
    """Logits `c tanh(h w^T / c)`, the loss, and the gradients of whichever of the two the caller uses."""
    h, w, labels = inputs(4)
    cap = 2.0
    plain_logits = cap * torch.tanh(h @ w.T / cap)
    logits, loss = softcapped_logits_and_loss((h * (2.0 / cap)) @ w.T, cap, labels, num_items_in_batch=denominator)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(plain_loss(h, w, labels, cap, denominator).item(), rel=1e-12)

    def objective(logits, loss):
        extra = (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).square().mean()
        return {"loss": 3.0 * loss, "logits": extra, "both": 3.0 * loss + extra}[uses]

    expected = torch.autograd.grad(objective(plain_logits, plain_loss(h, w, labels, cap, denominator)), (h, w))
    for got, want in zip(torch.autograd.grad(objective(logits, loss), (h, w)), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_softcapped_loss_takes_shift_labels_and_its_logits_are_guarded_against_in_place_edits(small_chunks):
    h, w, labels = inputs(5)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    logits, loss = softcapped_logits_and_loss((h * 2.0) @ w.T, 1.0, shift_labels=shifted)
    assert loss.item() == pytest.approx(plain_loss(h, w, labels, 1.0).item(), rel=1e-12)
    logits.add_(1.0)  # the backward needs the logits it returned: autograd refuses, rather than a wrong gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="labels"):
        softcapped_logits_and_loss(torch.zeros(1, 2, 3), 1.0)


def test_nanohead_trains_through_the_fused_soft_cap_on_cpu_with_the_plain_paths_results():
    """In training with labels (CPU, eager) the model's loss goes through `softcapped_logits_and_loss`; its logits,
    loss and gradients equal the soft-cap and cross-entropy written out in float64, to float32 rounding (the model's
    logits are float32)."""
    plain, _ = nanohead_pair(tie=False)
    input_ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(6))
    labels = input_ids.clone()
    labels[1, 5:] = -100
    out = plain(input_ids, labels=labels)
    assert type(out.logits.grad_fn).__name__ == "_SoftcappedCrossEntropyBackward"
    out.loss.backward()
    got = {name: p.grad.clone() for name, p in plain.named_parameters()}
    plain.zero_grad()
    hidden = plain.model(input_ids).last_hidden_state
    cap = plain.config.final_logit_softcapping
    logits = cap * torch.tanh(plain.lm_head(hidden) / cap)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.logits, logits.detach().float(), rtol=1e-6, atol=1e-6)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    for name, parameter in plain.named_parameters():
        expected = parameter.grad
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=name)
    with torch.no_grad():  # no gradient: the plain in-place cap, the same float32 operations
        assert torch.equal(plain(input_ids, labels=labels).logits, out.logits.detach())


@pytest.mark.parametrize("denominator", [None, 11])
def test_chunked_cross_entropy_equals_the_plain_cross_entropy(small_chunks, denominator):
    h, w, labels = inputs(7)
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    count = torch.tensor(denominator) if denominator else (targets != -100).sum()
    loss = modeling_zoo_common.chunked_cross_entropy(h @ w.T, targets, count)
    expected = plain_loss(h, w, labels, denominator=denominator)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for got, want in zip(torch.autograd.grad(2.5 * loss, (h, w)), torch.autograd.grad(2.5 * expected, (h, w))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arguments", [{}, {"num_items_in_batch": 7}, {"shift": True}, {"ignore_index": 5}])
def test_zoo_causal_lm_loss_is_transformers_for_causal_lm_loss(small_chunks, arguments):
    """The same value and gradient as `ForCausalLMLoss` for each of its arguments (float32, the chunked path)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    h, w, labels = (t.float() if t.is_floating_point() else t for t in inputs(8))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    kwargs = dict(arguments)
    if kwargs.pop("shift", False):
        kwargs["shift_labels"] = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()  # as transformers needs
    if "ignore_index" in kwargs:
        labels = torch.where(labels == -100, 5, labels)
    logits = h @ w.T
    loss = modeling_zoo_common.zoo_causal_lm_loss(logits, labels, 37, **kwargs)
    assert type(loss.grad_fn).__name__ == "_ChunkedCrossEntropyBackward"
    expected = ForCausalLMLoss(h @ w.T, labels, 37, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(expected, (h, w))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no gradient to spare: transformers' own loss
        assert modeling_zoo_common.zoo_causal_lm_loss(h @ w.T, labels, 37, **kwargs).item() == expected.item()


@pytest.mark.parametrize("model_type", ["npt_llama", "toeplitz_mixer", "masked_diffusion_lm"])
def test_each_models_labels_loss_runs_chunked_with_its_plain_gradients(model_type):
    """A zoo LM's training loss on a CPU runs through the chunked cross-entropy, with the loss and gradients of the
    plain loss; a `loss_function` set on the model is honoured instead (transformers' override)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from hf_models.registry import get_spec

    spec = get_spec(model_type)
    torch.manual_seed(0)
    model = spec.model_class(spec.make_config(dict(spec.tiny_config))).eval()  # no dropout; gradients still flow
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9))
    labels = input_ids.clone()
    labels[0, :5] = -100
    out = model(input_ids=input_ids, labels=labels)
    assert type(out.loss.grad_fn).__name__ == "_ChunkedCrossEntropyBackward"
    out.loss.backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    if model_type == "masked_diffusion_lm":
        logits = model(input_ids=input_ids).logits
        plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    else:
        called = []
        model.loss_function = lambda **kwargs: called.append(1) or ForCausalLMLoss(**kwargs)
        plain = model(input_ids=input_ids, labels=labels).loss
        assert called and type(plain.grad_fn).__name__ != "_ChunkedCrossEntropyBackward"
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-6)
    plain.backward()
    for name, parameter in model.named_parameters():
        if name in chunked:
            expected = parameter.grad
            torch.testing.assert_close(chunked[name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(),
                                       msg=name)


def test_nanohead_honours_a_loss_function_set_on_the_model():
    """transformers' override (`model.loss_function = ...`) replaces the fused soft-cap and loss too."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    plain, _ = nanohead_pair(tie=False)
    input_ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(7))
    called = []
    plain.loss_function = lambda **kwargs: called.append(1) or ForCausalLMLoss(**kwargs)
    out = plain(input_ids, labels=input_ids)
    assert called and type(out.logits.grad_fn).__name__ != "_SoftcappedCrossEntropyBackward"
