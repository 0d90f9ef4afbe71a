"""Shared modeling machinery of the zoo: the pre-trained-model base, the base of non-key/value caches (built on
transformers' linear-attention cache layers), the rotary embedding, the FFT causal convolution, and CPU helpers:
the few-rows head product, a chunked cross-entropy and a dropout that compiles well.

Like `configuration_zoo_common.py`, this file is copied next to saved weights for remote code, so it depends
only on `torch`, `transformers` and sibling modules.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, LinearAttentionLayer
from transformers.models.llama.modeling_llama import rotate_half

from .configuration_zoo_common import bundle_remote_code, parent_imports_skipped


class ZooPreTrainedModel(PreTrainedModel):
    """`PreTrainedModel` whose saved folders load with `trust_remote_code=True` where `hf_models` is absent, and
    whose `resize_token_embeddings` resizes every head over the vocabulary.

    Attributes:
        _vocabulary_heads: dotted names of the `nn.Linear` heads over the input vocabulary besides the output
            embeddings (e.g. an auxiliary sampler's projection); `resize_token_embeddings` resizes them too (a head
            that is `None` in this config is skipped). A head over another vocabulary (Bicameral's token head, over
            the teacher's tokens) is not listed.
    """

    _vocabulary_heads: tuple[str, ...] = ()

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        for name in self._vocabulary_heads:
            *path, attribute = name.split(".")
            parent = self
            for part in path:
                parent = getattr(parent, part, None)
            head = getattr(parent, attribute, None)
            if head is not None:
                setattr(parent, attribute, self._get_resized_lm_head(head, embeddings.weight.shape[0],
                                                                     mean_resizing=mean_resizing))
        return embeddings

    def causal_lm_loss(
        self, logits: torch.Tensor, labels: torch.LongTensor | None, **kwargs: Any
    ) -> torch.Tensor | None:
        """The language-model loss of a causal head (transformers' `ForCausalLMLoss`: cross-entropy of `logits`
        `(batch, seq, vocab)` against `labels` `(batch, seq)` shifted by one, `-100` ignored; `kwargs` such as
        `num_items_in_batch` pass through), or `None` without labels. Computed by `zoo_causal_lm_loss` (chunked on
        a CPU), or by `self.loss_function` when it was set or `loss_type` names another loss."""
        if labels is None:
            return None
        if not self.uses_default_causal_loss():
            return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return zoo_causal_lm_loss(logits, labels, self.config.vocab_size, **kwargs)

    def uses_default_causal_loss(self) -> bool:
        """Whether the causal loss is transformers' default `ForCausalLMLoss` (so the zoo may compute it its own
        way): no `loss_function` set on the model and no other `loss_type`."""
        return not hasattr(self, "_loss_function") and getattr(self, "loss_type", None) in (None, "ForCausalLM")

    def _map_every_auto_class(self) -> None:
        """Add every class of this model's module registered with an `Auto*` factory to the config's `auto_map`.

        transformers records only the saved class (and the config); with the rest, `AutoModel` loads the headless
        model of a saved `...ForCausalLM` folder through remote code too.
        """
        module_name = type(self).__module__
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for obj in vars(sys.modules[module_name]).values():
            if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == module_name \
                    and obj._auto_class is not None:
                auto_map.setdefault(obj._auto_class, f"{module_name.split('.')[-1]}.{obj.__name__}")
        self.config.auto_map = auto_map

    def save_pretrained(self, save_directory: str | Path, *args: Any, push_to_hub: bool = False, **kwargs: Any):
        repo_id = kwargs.pop("repo_id", None)
        hub_kwargs = {key: kwargs.pop(key) for key in ("commit_message", "private", "create_pr") if key in kwargs}
        if self._auto_class is not None:
            self._map_every_auto_class()
        with parent_imports_skipped():
            super().save_pretrained(save_directory, *args, push_to_hub=False, **kwargs)
        bundle_remote_code(save_directory)
        if push_to_hub:
            self.push_to_hub(repo_id or Path(save_directory).name, token=kwargs.get("token"), **hub_kwargs)


class ZooRotaryEmbedding(nn.Module):
    """Rotary embedding (Llama's, with a plain `theta`): `cos`/`sin` tables `(batch, seq, head_dim)` for given
    positions; rotate with [`apply_rotary`]."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int) -> torch.Tensor:
    """Rotate `x` (heads on dimension `heads_dim`: 1 for `(batch, heads, seq, dim)`, 2 for `(batch, seq, heads,
    dim)`) by the angles of `cos`/`sin` `(batch, seq, dim)`, with transformers' `rotate_half`."""
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    return x * cos + rotate_half(x) * sin


# At most this many rows, a CPU `nn.Linear` may run as `weight @ x^T` (see `few_rows_linear`).
FEW_ROWS = 8
# Per (out_features, in_features, rows, dtype): whether `weight @ x^T` is the faster form on this CPU (measured by
# `transposed_product_is_faster` at the first eager call of the shape).
TRANSPOSED_IS_FASTER: dict[tuple[int, int, int, torch.dtype], bool] = {}


def _seconds(product: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


def transposed_product_is_faster(weight: torch.Tensor, rows: int) -> bool:
    """Whether `weight @ x^T` (one row computed as two) beats `x @ weight^T` on this CPU for `rows` rows of `x` and
    this `weight` `(out, in)`: timed once per shape, row count and dtype (a warm-up and the best of three of each,
    a few ms for a vocabulary-wide head), then remembered in `TRANSPOSED_IS_FASTER`. Inside a compiled graph, where
    nothing can be timed, a shape measured before is answered from the table, and an unmeasured one is `False`.

    Which is faster depends on the CPU's BLAS: on one AMD EPYC core, with a 32768 x 256 head, the transposed form
    won at every row count (one row 4.3 → 1.9 ms, four 7.1 → 2.9 ms); on one Xeon core it lost at one and two rows
    (6.9 against 9.4 ms) and won from four (14.6 → 10.1 ms at four, 21.9 → 10.1 ms at eight).
    """
    key = (*weight.shape, rows, weight.dtype)
    known = TRANSPOSED_IS_FASTER.get(key)
    if known is not None or torch.compiler.is_compiling():
        return bool(known)
    with torch.no_grad():
        x = torch.full((rows, weight.shape[1]), 0.5, dtype=weight.dtype)  # no random draw: the RNG is the caller's
        pair = x.repeat(2, 1) if rows == 1 else x
        forms = (lambda: x @ weight.T, lambda: weight @ pair.T)
        for form in forms:
            form()
        plain, transposed = (_seconds(form) for form in forms)
    TRANSPOSED_IS_FASTER[key] = transposed < plain
    return TRANSPOSED_IS_FASTER[key]


def few_rows_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for `x` `(..., in_features)` → `(..., out_features)`; on a CPU, a plain `nn.Linear` (no hooks, so
    not wrapped by PEFT or a quantiser) applied to at most `FEW_ROWS` rows runs as `weight @ x^T` instead where that
    form is the faster one on this CPU (`transposed_product_is_faster`).

    That is the decode step's product with a vocabulary-wide head, most of a step at 32k tokens: CPU BLAS (MKL /
    oneDNN) can be 2-3x slower for `x @ weight^T` with a few rows of `x` than for the same product written
    `weight @ x^T`, depending on the CPU and the row count. The same numbers up to float summation order.
    """
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (type(linear) is not nn.Linear or x.device.type != "cpu" or not 0 < rows <= FEW_ROWS
            or linear._forward_hooks or linear._forward_pre_hooks
            or not transposed_product_is_faster(linear.weight, rows)):
        return linear(x)
    # row-major rows: BLAS's fast case is `x^T` with strides (1, in_features), not a copy laid out as `x^T`
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    if rows == 1:
        flat = flat.repeat(2, 1)
    out = (linear.weight @ flat.T).T[:rows]
    if linear.bias is not None:
        out = out + linear.bias.to(out.dtype)  # under autocast the product is in the lower precision
    return out.reshape(*x.shape[:-1], out.shape[-1])


IGNORE_INDEX = -100
LOSS_CHUNK = 64  # rows per chunk of the chunked cross-entropies (64 x 32768 float32: 8 MB, in the cache)


def causal_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, num_items_in_batch: Any,
                   device: torch.device, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """`ForCausalLMLoss`'s flat targets `(tokens,)` (`shift_labels`, else `labels` shifted by one; `ignore_index`
    becomes `IGNORE_INDEX`) and its denominator `()` (`num_items_in_batch`, else the number of targets)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("the causal-LM loss needs `labels` or `shift_labels`")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(device)
    if ignore_index != IGNORE_INDEX:
        targets = torch.where(targets == ignore_index, IGNORE_INDEX, targets)
    if num_items_in_batch is None:
        return targets, (targets != IGNORE_INDEX).sum()
    return targets, torch.as_tensor(num_items_in_batch, device=device)


def chunked_log_normalisers(logits: torch.Tensor, transform: Callable[[torch.Tensor], Any] | None = None
                            ) -> torch.Tensor:
    """logsumexp over the last dimension of `logits` `(rows, vocab)`, `LOSS_CHUNK` rows at a time (no
    vocabulary-wide temporary), after `transform(chunk)` has updated each chunk in place (if given) → `(rows,)`."""
    normalisers = logits.new_empty(logits.shape[0])
    for start in range(0, logits.shape[0], LOSS_CHUNK):
        chunk = logits[start:start + LOSS_CHUNK]
        if transform is not None:
            transform(chunk)
        torch.logsumexp(chunk, dim=-1, out=normalisers[start:start + LOSS_CHUNK])
    return normalisers


def softmax_gradient_(out: torch.Tensor, logits: torch.Tensor, normalisers: torch.Tensor, weights: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """Write `weights * (softmax(logits) - onehot(targets))` into `out` (all `(rows, vocab)`; `normalisers`,
    `weights`, `targets` `(rows,)`): the gradient of `sum(weights * cross_entropy)` with respect to the logits."""
    torch.sub(logits, normalisers[:, None], out=out).exp_().mul_(weights[:, None])
    return out.scatter_add_(1, targets[:, None], -weights[:, None])


def cross_entropy_from_normalisers(logits: torch.Tensor, targets: torch.Tensor, normalisers: torch.Tensor,
                                   denominator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sum over targets of (normaliser - target logit) / denominator` for `logits` `(rows, vocab)` and `targets`
    `(rows,)` (`IGNORE_INDEX` skipped), with the targets made safe to index (`0` where ignored) and the valid mask."""
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    return ((normalisers - picked) * valid).sum() / denominator.to(logits.dtype), safe, valid


class _ChunkedCrossEntropy(torch.autograd.Function):
    """`(logits (rows, vocab), targets (rows,), denominator ())` → `sum over targets of cross-entropy / denominator`
    (`IGNORE_INDEX` skipped); saves the logits themselves, and the backward writes their gradient into one new
    tensor, chunk by chunk (`softmax_gradient_`)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        normalisers = chunked_log_normalisers(logits)
        loss, safe, valid = cross_entropy_from_normalisers(logits, targets, normalisers, denominator)
        ctx.save_for_backward(logits, safe, valid, normalisers, denominator)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        logits, safe, valid, normalisers, denominator = ctx.saved_tensors
        weights = valid.to(logits.dtype) * (grad_loss / denominator.to(logits.dtype))
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            softmax_gradient_(grad[rows], logits[rows], normalisers[rows], weights[rows], safe[rows])
        return grad, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """`sum(cross_entropy(logits, targets)) / denominator` over the targets that are not `IGNORE_INDEX`: logits
    `(..., vocab)`, targets `(...)`; the same value as `F.cross_entropy` (up to float summation order) with one
    vocabulary-wide allocation (the gradient) where it makes three (its log-softmax, the one-hot gradient of the
    loss and the log-softmax's gradient). On a CPU each fresh 268 MB tensor (8 x 256 positions, 32,768 tokens) costs
    more than the arithmetic written into it (page faults on new memory)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _ChunkedCrossEntropy.apply(flat, targets.reshape(-1).to(logits.device), denominator)


def uses_chunked_loss(logits: torch.Tensor) -> bool:
    """Whether a loss on `logits` runs chunked: on a CPU, in eager mode (a compiled graph fuses the plain loss
    itself), when a gradient will flow to float32 logits (without one the plain loss allocates no gradients)."""
    return (logits.device.type == "cpu" and logits.requires_grad and logits.dtype == torch.float32
            and not torch.compiler.is_compiling())


def zoo_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int | None = None,
                       num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                       shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` (same arguments, same value), computed by `chunked_cross_entropy` where
    `uses_chunked_loss` holds, else by `ForCausalLMLoss` itself. `logits` `(batch, seq, vocab)`."""
    if not uses_chunked_loss(logits):
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(logits, labels, vocab_size or logits.shape[-1], num_items_in_batch=num_items_in_batch,
                               ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
    targets, denominator = causal_targets(labels, shift_labels, num_items_in_batch, logits.device, ignore_index)
    return chunked_cross_entropy(logits, targets, denominator)


DROPOUT_LEVELS = 2**16  # ZooDropout's resolution: p is rounded to a multiple of 2^-16


def dropout_keep_threshold(p: float) -> int:
    """The number of the `DROPOUT_LEVELS` 16-bit values that drop an element: `round(p * 2^16)`, at least 0 and at
    most `2^16 - 1` (the rate ZooDropout applies is this over `2^16`)."""
    return min(max(round(p * DROPOUT_LEVELS), 0), DROPOUT_LEVELS - 1)


def _dropout_scale(like: torch.Tensor, p: float) -> torch.Tensor:
    """The inverted-dropout multiplier in the shape and dtype of `like`: 0 with probability `p' = n / 2^16` (`n =
    dropout_keep_threshold(p)`), else `1 / (1 - p')`.

    Each element compares a uniform 16-bit integer with `n`, and the integers are the four 16-bit lanes of full-range
    64-bit draws: one draw of torch's CPU generator per four elements, where `bernoulli_` makes one per element
    (5-6x faster on a CPU; FlashAttention's dropout similarly quantises p, to 8 bits)."""
    dropped = dropout_keep_threshold(p)
    count = like.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=like.device).random_(-2**63, 2**63 - 1)
    lanes = draws.view(torch.int16)[:count].view(like.shape)  # uniform over [-2^15, 2^15)
    keep = lanes >= dropped - DROPOUT_LEVELS // 2
    return keep.to(like.dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))


def register_opaque_op(name: str, function: Callable, fake: Callable, backward: Callable | None = None,
                       setup_context: Callable | None = None) -> None:
    """Register `function` as the operator `hf_zoo::<name>`, which `torch.compile` keeps whole without a graph break
    (`fake` gives its outputs' shapes; `backward` and `setup_context` its autograd formula, if any). Registered once,
    even when a remote-code copy of the defining file is imported beside `hf_models`."""
    if hasattr(torch.ops.hf_zoo, name):
        return
    torch.library.custom_op(f"hf_zoo::{name}", function, mutates_args=())
    torch.library.register_fake(f"hf_zoo::{name}", fake)
    if backward is not None:
        torch.library.register_autograd(f"hf_zoo::{name}", backward, setup_context=setup_context)


register_opaque_op("dropout_scale", _dropout_scale, lambda like, p: torch.empty_like(like))


class ZooDropout(nn.Dropout):
    """`nn.Dropout` (the same module in a state dict, the same inverted-dropout semantics) whose mask on a CPU costs
    one random draw per four elements.

    On a CPU, in training, the multiplier comes from `hf_zoo::dropout_scale` (see `_dropout_scale`): the rate is p
    rounded to a multiple of 2^-16 (0.1 → 0.1000061), the multiplier `1 / (1 - p')`, and drawing the mask is 5-6x
    faster than `nn.Dropout`'s `bernoulli_`, whose one draw per element took about a tenth of a Bicameral training step.
    Being an opaque operator, it also keeps `torch.compile` in one graph and out of inductor's CPU random numbers
    (slower still); only the multiplication is fused with its neighbours. Other devices use `nn.Dropout` itself.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` of any shape, with dropout in training."""
        if self.training and 0 < self.p < 1 and hidden_states.device.type == "cpu":
            return hidden_states * torch.ops.hf_zoo.dropout_scale(hidden_states.detach(), self.p)
        return super().forward(hidden_states)


def fft_causal_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`y[:, t] = sum_{j <= t} kernel[..., j] * x[:, t - j]` (zero before the start) by zero-padded real FFTs.

    Computed in float32 (float64 for float64 inputs) whatever the autocast or input dtype; causal up to the FFT's
    rounding (~1e-7 relative in float32). The FFT length is a power of two `>= seq + taps - 1` (taps beyond `seq`
    never reach an output and are dropped), so the circular convolution equals the linear one: no input after `t`
    reaches output `t`.

    Args:
        x: `(batch, seq, *channels)`.
        kernel: `(*kernel_channels, taps)`, broadcast against the leading channel dimensions of `x`: `(taps,)` is
            shared by every channel; `(heads, taps)` with `x` `(batch, seq, heads, head_dim)` is one kernel per head.

    Returns:
        `y` with the shape and dtype of `x`.
    """
    length = x.shape[1]
    kernel = kernel[..., :length]
    size = 1 << (length + kernel.shape[-1] - 2).bit_length()  # a power of two >= length + taps - 1
    work = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_freq = torch.fft.rfft(x.to(work), n=size, dim=1)
        k_freq = torch.fft.rfft(kernel.to(work), n=size, dim=-1).movedim(-1, 0)  # (bins, *kernel_channels)
        k_freq = k_freq.reshape(1, *k_freq.shape, *([1] * (x.dim() - 2 - (kernel.dim() - 1))))
        y = torch.fft.irfft(x_freq * k_freq, n=size, dim=1)[:, :length]
    return y.to(x.dtype)


def toeplitz_matrix(kernel: torch.Tensor, row_start: int, num_rows: int, num_cols: int) -> torch.Tensor:
    """Rows `row_start .. row_start + num_rows - 1` of the causal Toeplitz operator of each head.

    Args:
        kernel: `(H, S)` kernels, `kernel[h, m]` weighs the token `m` steps back.

    Returns:
        `(H, num_rows, num_cols)` with `M[h, i, s] = kernel[h, row_start + i - s]` if `s <= row_start + i`, else 0
        (target position on rows, source position on columns; the transpose of the seed's `vector_to_matrix`).
    """
    targets = torch.arange(row_start, row_start + num_rows, device=kernel.device)
    lag = targets[:, None] - torch.arange(num_cols, device=kernel.device)[None, :]
    return kernel[:, lag.clamp(min=0)].masked_fill(lag < 0, 0.0)


def dense_causal_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`fft_causal_conv` with one kernel shared by every channel, as a lower-triangular Toeplitz matrix product:
    exact (no FFT rounding) and, on a CPU, faster than the FFT below about a thousand positions (fewer passes over
    memory), but O(seq²) per channel.

    Args:
        x: `(batch, seq, channels)`.
        kernel: `(taps,)`.

    Returns:
        `y` `(batch, seq, channels)` in the dtype of `x`.
    """
    length = x.shape[1]
    taps = F.pad(kernel[:length], (0, max(0, length - kernel.shape[0])))
    return torch.matmul(toeplitz_matrix(taps[None], 0, length, length)[0].to(x.dtype), x)


class ZooStateLayer(LinearAttentionLayer):
    """One layer of a `ZooStateCache`: transformers' linear-attention cache layer holding named, batch-first tensors.

    Each state is a convolution state (a history of inputs: `kind="conv"`, kept in `conv_states`) or a recurrent
    state (running sums or counts: `kind="recurrent"`, in `recurrent_states`), indexed in the order they were first
    set, so transformers' cache utilities (`Cache.get_conv_state` / `get_recurrent_state` / `has_previous_state`,
    `reorder_cache` for beam search, `reset`, `is_linear`, `is_compileable`) read them. Unlike Mamba's conv state,
    the layout of each tensor is the architecture's (documented by its cache); only dimension 0 (the batch) is
    shared, which is all that beam search and batch selection need. A recurrent state makes the layer uncroppable:
    the past cannot be rolled back, so assisted and speculative decoding are refused.
    """

    is_sliding = False
    is_croppable = False  # transformers >= 5.25 makes linear-attention layers croppable by recording their past

    def __init__(self) -> None:
        super().__init__(number_of_states=0)
        self.state_slots: dict[str, tuple[str, int]] = {}  # name -> (kind, state_idx)

    def __repr__(self) -> str:
        shapes = {name: tuple(tensor.shape) for name, tensor in self.states.items()}
        return f"{self.__class__.__name__}({shapes})"

    @property
    def states(self) -> dict[str, torch.Tensor]:
        """The state tensors by name."""
        return {name: self.get_state(name) for name in self.state_slots}

    def get_state(self, name: str) -> torch.Tensor | None:
        if name not in self.state_slots:
            return None
        kind, index = self.state_slots[name]
        return (self.conv_states if kind == "conv" else self.recurrent_states)[index]

    def set_state(self, name: str, tensor: torch.Tensor, kind: str = "recurrent") -> None:
        """Store (or replace) the state `name`; `kind` (`"conv"` or `"recurrent"`) places a new name."""
        if name not in self.state_slots:
            if kind not in ("conv", "recurrent"):
                raise ValueError(f"kind must be 'conv' or 'recurrent', got {kind!r}")
            index = sum(slot_kind == kind for slot_kind, _ in self.state_slots.values())
            if index == self.number_of_states:
                self.number_of_states += 1
                for table, value in ((self.conv_states, None), (self.recurrent_states, None),
                                     (self.is_conv_states_initialized, False),
                                     (self.is_recurrent_states_initialized, False),
                                     (self.has_previous_state, False), (self.conv_kernel_size, None)):
                    table[index] = value
            self.state_slots[name] = (kind, index)
            self.device, self.dtype = tensor.device, tensor.dtype
        kind, index = self.state_slots[name]
        if kind == "conv":
            self.conv_states[index] = tensor
            self.is_conv_states_initialized[index] = True
        else:
            self.recurrent_states[index] = tensor
            self.is_recurrent_states_initialized[index] = True

    def mark_filled(self, filled: bool) -> None:
        """Record whether the states hold a past (transformers' `has_previous_state`)."""
        for index in range(self.number_of_states):
            self.has_previous_state[index] = filled

    @property
    def batch_size(self) -> int:
        return next(iter(self.states.values())).shape[0] if self.state_slots else -1

    def _replace_all(self, transform) -> None:
        for name, tensor in self.states.items():
            self.set_state(name, transform(tensor))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace_all(lambda tensor: tensor[indices.to(tensor.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace_all(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def activate_past_recording(self, **kwargs: Any) -> None:
        self.crop(0)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "This cache summarises the past in a state that cannot be rolled back, so it cannot be cropped "
            "(assisted or speculative decoding is not supported)."
        )


class ZooStateCache(Cache):
    """Base of the zoo's non-key/value caches (input histories, convolution states, running sums).

    It keeps one [`ZooStateLayer`] (a transformers `LinearAttentionLayer`) per model layer, so `cache.is_linear` is
    all `True` and `generate` treats it as Mamba's: it neither builds 4-D attention masks for it nor slices the
    prompt by its length; and the number of tokens seen so far, which the linear layers do not track. Subclasses
    allocate their tensors (preallocated, so a decode step never concatenates) and define the update rule the model
    calls. Models that use such a cache inherit [`ZooStateCacheGenerationMixin`], which creates it for `generate`.

    Besides the Python count `seen_tokens`, `cache_position` `(1,)` holds it as a tensor, advanced in place, so a
    shape-static decode step can index with it: a compiled step advances only the tensor (`advance_count(...,
    in_python=False)`; reading a per-step Python int would specialise the graph on it) and the Python count catches
    up from it, eagerly, when next read.

    Args:
        num_layers (`int`): number of layers holding state.
        max_length (`int`, *optional*): the most tokens the cache can hold (`None`: unbounded).
        device (*optional*): where `cache_position` lives (the states' device).
    """

    def __init__(self, num_layers: int, max_length: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(layers=[ZooStateLayer() for _ in range(num_layers)])
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        if not torch.compiler.is_compiling():  # a fixed address, as transformers' StaticCache keeps, for CUDA graphs
            torch._dynamo.mark_static_address(self.cache_position)
        self.seen_tokens = 0
        self.max_length = max_length

    def fix_addresses(self) -> None:
        """Mark every state tensor as a static address (as transformers' `StaticCache` does), so CUDA graphs can
        capture a compiled step's in-place writes; call after allocating the states."""
        if not torch.compiler.is_compiling():
            for layer in self.layers:
                for tensor in layer.states.values():
                    torch._dynamo.mark_static_address(tensor)

    @property
    def seen_tokens(self) -> int:
        """Tokens cached so far (a Python int, caught up from `cache_position` after compiled steps)."""
        if self._count_pending:
            self._seen_tokens = int(self.cache_position.item())
            self._count_pending = False
        return self._seen_tokens

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        self._seen_tokens = value
        self._count_pending = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_length is None else self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.cache_position.zero_()
        self.seen_tokens = 0

    def advance_count(self, num_tokens: int, in_python: bool = True) -> None:
        """Count `num_tokens` more tokens seen (after every layer has written its state); `in_python=False` (a
        compiled step) advances only `cache_position` and leaves the Python count to catch up when read."""
        if not in_python:
            self.cache_position.add_(num_tokens)
            self._count_pending = True
            return
        self.seen_tokens = self.seen_tokens + num_tokens
        self.cache_position.add_(num_tokens)
        for layer in self.layers:
            layer.mark_filled(True)

    def get_state(self, layer_idx: int, name: str) -> torch.Tensor | None:
        """The state tensor `name` of layer `layer_idx`, or `None` before it is first written."""
        return self.layers[layer_idx].get_state(name)

    def set_state(self, layer_idx: int, name: str, tensor: torch.Tensor, kind: str = "recurrent") -> None:
        """Store (or replace) the state tensor `name` (batch first) of layer `layer_idx`; `kind` places a new name:
        `"conv"` (an input history, croppable in principle) or `"recurrent"` (a running summary, the default)."""
        self.layers[layer_idx].set_state(name, tensor, kind)


class ZooStateCacheGenerationMixin:
    """For a `GenerationMixin` model whose cache is a [`ZooStateCache`]: `generate` asks the model for its cache.

    The model implements `_state_cache_for_generation(generation_config, batch_size)`, returning the cache to create
    before the prefill for `batch_size` rows (beams and returned sequences included), or `None` to let the model
    create it on the first cached forward pass. A user's cache is used as given; `use_cache=False` creates none. The
    cache implementations `"dynamic"` and `"static"` both name the model's own cache (it is preallocated); any other
    is refused.
    """

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' key/value caches do not fit: the model provides its own

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict[str, Any], generation_mode: Any, batch_size: int,
        max_cache_length: int,
    ) -> None:
        implementation = generation_config.cache_implementation
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                  max_cache_length)
            return
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation={implementation!r} is not supported by "
                             f"{type(self).__name__}: its cache is its own preallocated state (use 'dynamic', "
                             "'static' or None)")
        rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
        cache = self._state_cache_for_generation(generation_config, rows)
        if cache is not None:
            model_kwargs["cache"] = cache
