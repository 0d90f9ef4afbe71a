"""The language-model head and its cross-entropy in one chunked pass, without the `(tokens, vocab)` logits.

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
"""

from __future__ import annotations

import torch

from .modeling_zoo_common import register_opaque_op

IGNORE_INDEX = -100


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
    if shift_labels is None:
        if labels is None:
            raise ValueError("linear_cross_entropy needs `labels` or `shift_labels`")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    if ignore_index != IGNORE_INDEX:
        targets = torch.where(targets == ignore_index, IGNORE_INDEX, targets)
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = torch.ops.hf_zoo.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, softcap, chunk_size, denominator,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return loss


__all__ = ["linear_cross_entropy"]
