"""Cross-entropy kernels for the causal LMs' heads on a CPU, without vocabulary-wide temporaries.

`linear_cross_entropy` fuses the head and its cross-entropy in one chunked pass, without the `(tokens, vocab)` logits:

    loss = sum_i [lse_i - l_i[y_i]] / denominator,   l_i = c * tanh(W h_i / c)  (or W h_i without a soft-cap c)

The plain path writes the logits of every position, then passes over them again for the soft-cap, the log-softmax
and, in the backward, for each of their gradients: at 8 x 256 positions and 32,768 tokens that is about ten passes
over 268 MB. Here rows of `chunk_size` positions are done one after another: their logits, the loss, and already
the gradient of the logits, g = softmax - onehot(y) (times 1 - tanh^2 with a cap), which gives the gradients of the
hidden states (g W) and of the head (g^T h) at once; nothing vocabulary-wide outlives a chunk. The matmuls are the
same three as the plain path's (forward, and the two of its backward); only their order changes, so the result
equals the plain loss up to float summation order (tested). Liger-Kernel's fused linear cross-entropy does the same
on GPUs.

The gradients are computed in the forward whenever one is needed, so the backward only scales them by the
incoming gradient; under `torch.no_grad()` only the loss is computed. The computation is one opaque operator
(`hf_zoo::linear_cross_entropy`): `torch.compile` compiles the model around it without a graph break and runs the
loop eagerly.

`softcapped_logits_and_loss` keeps the logits (the model returns them) and fuses the soft-cap with the loss: the cap
is applied in place on the head's output and the loss and its gradient are computed chunk by chunk, so the only
vocabulary-wide tensors are the logits and, in the backward, their gradient. On a CPU each fresh 268 MB tensor costs
more than the arithmetic written into it (page faults on new memory: an allocating multiply 186 ms, the same multiply
in place 49 ms, one Xeon core); the plain soft-cap and cross-entropy allocate six.
"""

from __future__ import annotations

from typing import Any

import torch

from .modeling_zoo_common import IGNORE_INDEX, LOSS_CHUNK, causal_targets, chunked_log_normalisers, \
    cross_entropy_from_normalisers, register_opaque_op, softmax_gradient_


def _chunked_loss_and_gradients(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                softcap: float | None, chunk_size: int, denominator: torch.Tensor,
                                grad_hidden_wanted: bool, grad_weight_wanted: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss `()` and the gradients of the loss with respect to `hidden` `(tokens, hidden)` and `weight`
    `(vocab, hidden)` (empty where not wanted)."""
    grad_hidden = torch.empty_like(hidden) if grad_hidden_wanted else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight) if grad_weight_wanted else weight.new_empty(0)
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # the logits' (float32 for half inputs)
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    scale = 1.0 / denominator.to(dtype)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = hidden[start:start + chunk_size]
        target = targets[start:start + chunk_size]
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, 0)[:, None]
        sigmoid = None
        if softcap is None:
            logits = (rows @ weight.T).to(dtype)
        else:  # c tanh(z / c) = 2c sigmoid(2z / c) - c, as the model's plain path computes it (torch's CPU
            # sigmoid is 2-3x faster than its tanh); the scaling on the hidden states, not on the product
            sigmoid = ((rows * (2.0 / softcap)) @ weight.T).to(dtype).sigmoid_()
            logits = sigmoid.mul(2.0 * softcap).sub_(softcap)
        picked = logits.gather(1, safe).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        grad = logits.sub_(peak).exp_()  # exp(l - max), in place of the logits
        sums = grad.sum(dim=-1)
        total += ((peak.squeeze(1) + sums.log() - picked) * valid).sum()
        if not (grad_hidden_wanted or grad_weight_wanted):
            continue
        weights = valid.to(dtype) * scale
        grad.mul_((weights / sums)[:, None])  # the softmax, weighted by 1 / denominator on target rows
        grad.scatter_add_(1, safe, -weights[:, None])
        if sigmoid is not None:  # d(c tanh(z / c)) / dz = 1 - tanh^2 = 4 sigmoid (1 - sigmoid)
            grad.mul_(sigmoid.sub_(sigmoid.square()).mul_(4.0))
        grad = grad.to(weight.dtype)
        if grad_hidden_wanted:
            torch.mm(grad, weight, out=grad_hidden[start:start + chunk_size])
        if grad_weight_wanted:
            grad_weight.addmm_(grad.T, rows.to(weight.dtype))
    return total * scale, grad_hidden, grad_weight


def _fake(hidden, weight, targets, softcap, chunk_size, denominator, grad_hidden_wanted, grad_weight_wanted):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden.new_empty((), dtype=dtype), torch.empty_like(hidden) if grad_hidden_wanted else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight_wanted else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])
    ctx.wanted = inputs[6], inputs[7]


def _backward(ctx, grad_loss, _grad_of_grad_hidden, _grad_of_grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    hidden_wanted, weight_wanted = ctx.wanted
    return (grad_hidden * grad_loss.to(grad_hidden.dtype) if hidden_wanted else None,
            grad_weight * grad_loss.to(grad_weight.dtype) if weight_wanted else None,
            None, None, None, None, None, None)


# its backward only scales the gradients its forward computed
register_opaque_op("linear_cross_entropy", _chunked_loss_and_gradients, _fake, _backward, _setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    chunk_size: int = 256,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The causal-LM loss of `ForCausalLMLoss` (transformers' loss of `...ForCausalLM`) on the logits
    `softcap * tanh(hidden @ weight.T / softcap)` (or `hidden @ weight.T`), computed `chunk_size` positions at a time.

    Args:
        hidden: final hidden states `(batch, seq, hidden)`.
        weight: the head's weight `(vocab, hidden)`.
        labels: targets `(batch, seq)`, unshifted (position t predicts `labels[:, t + 1]`); `ignore_index` is skipped.
        softcap: the logit soft-cap c, or `None`.
        chunk_size: positions per chunk (each holds a `(chunk_size, vocab)` float32 buffer or two).
        num_items_in_batch: the denominator (a sum over the batch, as the Trainer passes it); default: the number
            of positions with a target.
        shift_labels: already-shifted targets `(batch, seq)`; used instead of `labels`.

    Returns the scalar loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    targets, denominator = causal_targets(labels, shift_labels, num_items_in_batch, hidden.device, ignore_index)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = torch.ops.hf_zoo.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, softcap, chunk_size, denominator,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return loss


class _SoftcappedCrossEntropy(torch.autograd.Function):
    """`(u, targets, denominator, c)` → `(y, loss)`: the logits `y = 2c sigmoid(u) − c` (= c tanh(u / 2): the soft-cap of
    `z = c u / 2`, the head's output before the model scaled it by 2 / c), written over `u`, and the cross-entropy.

    Backward: dL/du = (g_y + g_loss · (softmax(y) − onehot) · valid / denominator) · (c² − y²) / (2c), chunk by chunk
    into one new tensor (dy/du = 2c σ(1 − σ) with σ = (y + c) / 2c).
    """

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor,
                cap: float) -> tuple[torch.Tensor, torch.Tensor]:
        flat = u.view(-1, u.shape[-1])  # the input itself, not a view of another tensor (autograd's condition)
        normalisers = chunked_log_normalisers(flat, lambda chunk: chunk.sigmoid_().mul_(2.0 * cap).sub_(cap))
        loss, safe, valid = cross_entropy_from_normalisers(flat, targets, normalisers, denominator)
        ctx.mark_dirty(u)
        ctx.save_for_backward(u, safe, valid, normalisers, denominator)
        ctx.cap = cap
        ctx.set_materialize_grads(False)
        return u, loss

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor | None, grad_loss: torch.Tensor | None) -> tuple[Any, ...]:
        logits, safe, valid, normalisers, denominator = ctx.saved_tensors
        cap = ctx.cap
        grad = torch.empty_like(logits)
        flat, flat_grad = logits.view(-1, logits.shape[-1]), grad.view(-1, logits.shape[-1])
        incoming = None if grad_logits is None else grad_logits.reshape(flat.shape)
        weights = None if grad_loss is None else valid.to(logits.dtype) * (grad_loss / denominator.to(logits.dtype))
        for start in range(0, flat.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            out, chunk = flat_grad[rows], flat[rows]
            if weights is not None:
                softmax_gradient_(out, chunk, normalisers[rows], weights[rows], safe[rows])
                if incoming is not None:
                    out.add_(incoming[rows])
            elif incoming is not None:
                out.copy_(incoming[rows])
            else:
                out.zero_()
            out.mul_(chunk.square().sub_(cap * cap).mul_(-0.5 / cap))
        return grad, None, None, None


def softcapped_logits_and_loss(
    preactivation: torch.Tensor,
    cap: float,
    labels: torch.Tensor | None = None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft-capped logits `2c sigmoid(u) − c` (= `c tanh(z / c)` for `u = 2z / c`) and `ForCausalLMLoss` on them,
    with the cap and the loss fused (see the module docstring).

    Args:
        preactivation: `u` `(batch, seq, vocab)` float32, the head's output on hidden states scaled by `2 / c`;
            overwritten by the logits, so it must be a tensor no other autograd node saved (a matmul's output).
        cap: the soft-cap c.
        labels, num_items_in_batch, shift_labels, ignore_index: as `linear_cross_entropy`'s.

    Returns the logits `(batch, seq, vocab)` (the storage of `preactivation`) and the scalar loss. Equal to the plain
    soft-cap and cross-entropy up to float summation order (tested).
    """
    targets, denominator = causal_targets(labels, shift_labels, num_items_in_batch, preactivation.device,
                                          ignore_index)
    return _SoftcappedCrossEntropy.apply(preactivation, targets, denominator, cap)


__all__ = ["linear_cross_entropy", "softcapped_logits_and_loss"]
