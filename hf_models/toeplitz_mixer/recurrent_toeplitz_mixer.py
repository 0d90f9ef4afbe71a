"""Recurrent decoding of the Toeplitz mixer (`decode_mode="recurrent"`): each head's kernel distilled into an exact
short window plus a small diagonal (modal) state-space recurrence, so a decode step costs O(E·(W + N)) per layer
whatever the context, instead of the exact step's O(E·t). After "Laughing Hyena" (Massaroli et al., NeurIPS 2023),
which distils Hyena's long filters into modal SSMs for constant-memory generation.

Kernel model, per head h (k of length S, window W = `recurrent_window`, N = `recurrent_state_size` modes):

    k[m]     exact                               for m < W    (the last W mixer inputs, in a ring buffer)
    k[W + j] ≈ k̂[W + j] = Re Σ_n r_n λ_n^j       for j ≥ 0    (complex poles |λ_n| ≤ 1, complex residues r_n)

so the mixer output of position t (before the normaliser and bias, which stay exact) is

    y_t = Σ_{j < W} k[j] p_{t−j} + Re Σ_n r_n z_n[t],      z_n[t] = λ_n z_n[t−1] + p_{t−W}   (z_n[W − 1] = 0)

The prompt is mixed exactly (the prefill runs the ordinary convolution) and leaves the state the recurrence would
have reached, `z_n[T−1] = Σ_{s ≤ T−1−W} λ_n^{T−1−W−s} p_s`; only the new tokens see the approximation. With kernels
that are exactly a sum of N decaying (complex) exponentials beyond the window the recurrence is exact (tested).

Fit (`fit_modal_kernel`, once per weight version, in float64): the matrix-pencil method on the tail k[W:] gives
2N candidate poles (the eigenvalues of the shift between the leading right singular vectors of its Hankel matrix;
a real kernel gives conjugate pairs, one of each is kept, and Re(·) supplies the other), the residues by linear least
squares, the N modes of largest energy kept and their residues refitted. Poles are clamped inside the unit circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache_toeplitz_mixer import ToeplitzMixerCache
from .configuration_toeplitz_mixer import ToeplitzMixerConfig

MAX_PENCIL_COLUMNS = 256  # Hankel width of the pencil (enough for 2N <= 128 poles; the SVD stays cheap at S = 8192)
MAX_POLE_RADIUS = 1.0 - 1e-6


@dataclass
class ModalFit:
    """Modes of one layer's kernels: `poles` and `residues` `(H, N)` complex128, `window` W, `window_kernel` `(H, W)`
    (the exact taps k[:W]) and `relative_error` `(H,)`, `‖k − k̂‖ / ‖k‖` over the whole kernel (taps < W exact)."""

    poles: torch.Tensor
    residues: torch.Tensor
    window: int
    window_kernel: torch.Tensor
    relative_error: torch.Tensor


def _mode_basis(poles: torch.Tensor, length: int) -> torch.Tensor:
    """`(length, 2K)` real basis: columns `Re(λ_k^j)` then `−Im(λ_k^j)`, so `basis @ [Re r; Im r] = Re Σ r_k λ_k^j`."""
    steps = torch.arange(length, dtype=torch.float64, device=poles.device)[:, None]
    powers = torch.polar(poles.abs()[None, :] ** steps, poles.angle()[None, :] * steps)  # polar form: 0^0 = 1
    return torch.cat([powers.real, -powers.imag], dim=1)


def _least_squares_residues(poles: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Complex residues `(K,)` minimising `‖Re Σ r_k λ_k^j − tail[j]‖²` (minimum-norm where modes coincide)."""
    basis = _mode_basis(poles, tail.shape[0])
    coeffs = torch.linalg.lstsq(basis, tail[:, None], driver="gelsd").solution[:, 0]
    count = poles.shape[0]
    return torch.complex(coeffs[:count], coeffs[count:])


def _pencil_poles(tail: torch.Tensor, order: int) -> torch.Tensor:
    """`order` poles of the sequence `tail` by the matrix-pencil method (upper half-plane representatives)."""
    columns = min(MAX_PENCIL_COLUMNS, tail.shape[0] // 2)
    hankel = tail.unfold(0, columns + 1, 1)  # (length - columns, columns + 1), row i = tail[i : i + columns + 1]
    order = min(order, columns)
    right = torch.linalg.svd(hankel, full_matrices=False).Vh[:order].T  # (columns + 1, order)
    poles = torch.linalg.eigvals(torch.linalg.pinv(right[:-1]) @ right[1:])
    poles = poles[poles.imag >= -1e-12]
    poles = torch.complex(poles.real, poles.imag.clamp(min=0.0))
    radius = poles.abs().clamp(min=1e-12)
    return poles * (radius.clamp(max=MAX_POLE_RADIUS) / radius)


def fit_modal_kernel(kernel: torch.Tensor, state_size: int, window: int) -> ModalFit:
    """Fit each head's kernel beyond the first `window` taps with `state_size` complex modes.

    Args:
        kernel: `(H, S)` effective kernels (any float dtype; the fit runs in float64 on the kernel's device).
        state_size: modes N per head.
        window: exact taps W (`0 <= W < S`).

    Returns:
        The [`ModalFit`]; heads whose tail is too short for N distinct modes get fewer, padded with zero modes.
    """
    heads, length = kernel.shape
    if not 0 <= window < length:
        raise ValueError(f"`recurrent_window` must lie in [0, {length}), got {window}")
    kernel = kernel.detach().to(torch.float64)
    poles = torch.zeros(heads, state_size, dtype=torch.complex128, device=kernel.device)
    residues = torch.zeros_like(poles)
    errors = torch.zeros(heads, dtype=torch.float64, device=kernel.device)
    for h in range(heads):
        tail = kernel[h, window:]
        if tail.shape[0] >= 4 and tail.abs().max() > 0:
            candidates = _pencil_poles(tail, 2 * state_size)
            weights = _least_squares_residues(candidates, tail)
            # energy of mode k over the tail: |r_k| · sqrt(Σ_j |λ_k|^{2j})
            radius = candidates.abs()
            steps = torch.arange(tail.shape[0], dtype=torch.float64, device=kernel.device)
            energy = weights.abs() * (radius[:, None] ** (2 * steps[None, :])).sum(1).sqrt()
            kept = candidates[energy.argsort(descending=True)[:state_size]]
            poles[h, :kept.shape[0]] = kept
            residues[h, :kept.shape[0]] = _least_squares_residues(kept, tail)
        fitted = _mode_basis(poles[h], length - window) @ torch.cat([residues[h].real, residues[h].imag])
        errors[h] = (fitted - kernel[h, window:]).norm() / kernel[h].norm().clamp(min=1e-30)
    return ModalFit(poles=poles, residues=residues, window=window, window_kernel=kernel[:, :window],
                    relative_error=errors)


def modal_tables(fit: ModalFit, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The fit as the real tensors the decode step multiplies with: `poles_re`, `poles_im`, `residues_re`,
    `residues_im` `(H, N)` and `window_taps` `(W, H, W)`, where `window_taps[t mod W, h, q] = k[h, (t − q) mod W]`
    weighs ring slot q at position t."""
    window = fit.window
    lags = (torch.arange(window)[:, None] - torch.arange(window)[None, :]) % max(window, 1)  # (t mod W, slot)
    taps = fit.window_kernel[:, lags.to(fit.window_kernel.device)].permute(1, 0, 2)  # (W, H, W)
    return {"poles_re": fit.poles.real.to(dtype), "poles_im": fit.poles.imag.to(dtype),
            "residues_re": fit.residues.real.to(dtype), "residues_im": fit.residues.imag.to(dtype),
            "window_taps": taps.to(dtype)}


class ToeplitzRecurrentCache(ToeplitzMixerCache):
    """Constant-size decoding state of a [`ToeplitzMixerModel`] under `decode_mode="recurrent"`.

    Per layer: `window` `(batch, num_heads, W, head_dim)`, a ring buffer of the last W mixer inputs (position q in slot
    q mod W; a convolution state), and `modes_re` / `modes_im` `(batch, num_heads, N, head_dim)`, the real and
    imaginary parts of the modal states z (recurrent states). Layer 0 also keeps the token ids and per-row positions
    of [`ToeplitzMixerCache`] (for the normaliser, the bias and `context_overflow="sliding_recompute"`). Apart from
    those ids (one integer per position) the memory does not grow with the context; every write is in place at the
    tensor position `cache_position`, so the step compiles to one graph as the exact static step does.
    """

    def _allocate_layer(self, layer_idx: int, config: ToeplitzMixerConfig, batch_size: int,
                        device: torch.device | str | None, dtype: torch.dtype) -> None:
        heads, dim = config.num_heads, config.head_dim
        if config.recurrent_window:
            self.set_state(layer_idx, "window", torch.zeros(batch_size, heads, config.recurrent_window, dim,
                                                            device=device, dtype=dtype), kind="conv")
        for name in ("modes_re", "modes_im"):
            self.set_state(layer_idx, name, torch.zeros(batch_size, heads, config.recurrent_state_size, dim,
                                                        device=device, dtype=dtype), kind="recurrent")

    def fill(self, layer_idx: int, p: torch.Tensor, tables: dict[str, torch.Tensor]) -> None:
        """Set the state after an exactly mixed prompt `p` `(B, T, H, D)` at positions 0..T−1: the last W inputs
        into the ring and `z[T−1] = Σ_{s ≤ T−1−W} λ^{T−1−W−s} p_s` into the modes."""
        length = p.shape[1]
        window = self.get_state(layer_idx, "window")
        if window is not None:
            size = window.shape[2]
            keep = min(length, size)
            slots = torch.arange(length - keep, length, device=p.device) % size
            window.index_copy_(2, slots, p[:, length - keep:].transpose(1, 2))
        else:
            size = 0
        exponents = (length - 1 - size) - torch.arange(length, device=p.device, dtype=torch.float64)  # (T,)
        poles = torch.complex(tables["poles_re"].double(), tables["poles_im"].double())  # (H, N)
        log_radius = poles.abs().clamp(min=1e-300).log()
        magnitude = torch.exp(exponents.clamp(min=0) * log_radius[..., None])  # (H, N, T)
        magnitude = magnitude * (exponents >= 0)
        angle = exponents.clamp(min=0) * poles.angle()[..., None]
        work = p.to(torch.float64)
        for name, powers in (("modes_re", magnitude * angle.cos()), ("modes_im", magnitude * angle.sin())):
            self.get_state(layer_idx, name).copy_(torch.einsum("hns,bshd->bhnd", powers, work).to(p.dtype))

    def step(self, layer_idx: int, p: torch.Tensor, tables: dict[str, torch.Tensor],
             slot_position: torch.Tensor) -> torch.Tensor:
        """Mix one new token `p` `(B, 1, H, D)` in the slot `slot_position` (a `(1,)` tensor: the cached tokens
        before it, padding included) and advance this layer's state; returns `y` `(B, 1, H, D)` (before the
        normaliser and bias)."""
        new = p.transpose(1, 2)  # (B, H, 1, D)
        window = self.get_state(layer_idx, "window")
        if window is not None:
            size = window.shape[2]
            slot = slot_position % size
            leaving = window.index_select(2, slot)  # p_{t−W} (zero while t < W)
            window.index_copy_(2, slot, new)
            taps = tables["window_taps"].index_select(0, slot)  # (1, H, W)
            y = (window * taps[..., None]).sum(2)  # (B, H, D)
        else:
            leaving, y = new, 0.0
        modes_re, modes_im = self.get_state(layer_idx, "modes_re"), self.get_state(layer_idx, "modes_im")
        a, b = tables["poles_re"][None, :, :, None], tables["poles_im"][None, :, :, None]
        new_re = a * modes_re - b * modes_im + leaving
        new_im = a * modes_im + b * modes_re
        modes_re.copy_(new_re)
        modes_im.copy_(new_im)
        tail = (tables["residues_re"][None, :, :, None] * new_re
                - tables["residues_im"][None, :, :, None] * new_im).sum(2)
        return (y + tail)[:, None]


__all__ = ["ModalFit", "ToeplitzRecurrentCache", "fit_modal_kernel", "modal_tables"]
