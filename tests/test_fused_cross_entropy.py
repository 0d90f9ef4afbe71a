"""The fused LM head + soft-cap + cross-entropy (`hf_models.fused_cross_entropy`) against the plain path in float64:
loss and both gradients, with ignored positions, a chunk size that does not divide the positions, the Trainer's
`num_items_in_batch` and pre-shifted labels; and Nanohead's `loss_chunk_size` switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_models.fused_cross_entropy import linear_cross_entropy
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
    assert evaluated.loss.item() == pytest.approx(out_plain.loss.item(), rel=1e-12)


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
