"""Adaptive weighting of the NPT losses: inverse gradient norm, GradNorm, uncertainty and the original code's
version."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _grad_norm(loss: torch.Tensor, parameters: Sequence[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    zero = torch.zeros((), device=parameters[0].device if parameters else None)
    return torch.sqrt(sum((g.float().pow(2).sum() for g in grads if g is not None), zero))


class InverseGradNormWeighting(nn.Module):
    """Per-loss gradient-norm balancing on the shared (NP) parameters: every `every` steps g_i = ‖∇θ L_i‖, EMA
    ḡ_i (β), w_i = π_i · mean(ḡ)/(ḡ_i + ε), clipped to [0.1 π_i, 10 π_i] and rescaled so that sum w = sum π."""

    def __init__(self, every: int = 10, beta: float = 0.9) -> None:
        super().__init__()
        self.every, self.beta = every, beta
        self.ema: dict[str, float] = {}
        self.factors: dict[str, float] = {}

    def forward(self, losses: Mapping[str, torch.Tensor], priors: Mapping[str, float],
                parameters: Sequence[nn.Parameter], step: int) -> dict[str, float]:
        names = list(losses)
        if names and (step % self.every == 0 or not self.factors) and torch.is_grad_enabled():
            for name in names:
                norm = float(_grad_norm(losses[name], parameters))
                self.ema[name] = norm if name not in self.ema else self.beta * self.ema[name] + (1 - self.beta) * norm
            mean = sum(self.ema[n] for n in names) / len(names)
            raw = {n: min(max(mean / (self.ema[n] + 1e-12), 0.1), 10.0) for n in names}
            scale = sum(priors[n] for n in names) / sum(priors[n] * raw[n] for n in names)
            self.factors = {n: raw[n] * scale for n in names}
        return {n: priors[n] * self.factors.get(n, 1.0) for n in names}


class GradNormWeighting(nn.Module):
    """GradNorm (Chen et al. 2018): learnable w_i (sum w = n), G_i = ‖∇θ(π_i w_i L_i)‖, r_i = (L_i/L_i(0)) /
    mean_j(L_j/L_j(0)), L_grad = sum_i |G_i - mean(G)·r_i^α| with the target detached; w has its own Adam step."""

    def __init__(self, names: Sequence[str], alpha: float = 1.5, lr: float = 0.025, every: int = 1) -> None:
        super().__init__()
        self.names, self.alpha, self.every = list(names), alpha, every
        self.weights = nn.Parameter(torch.ones(len(self.names)))
        self.optimizer = torch.optim.Adam([self.weights], lr=lr)
        self.initial: dict[str, float] = {}

    def forward(self, losses: Mapping[str, torch.Tensor], priors: Mapping[str, float],
                parameters: Sequence[nn.Parameter], step: int) -> dict[str, float]:
        names = [n for n in self.names if n in losses]
        if names and step % self.every == 0 and torch.is_grad_enabled():
            for n in names:
                self.initial.setdefault(n, max(float(losses[n].detach()), 1e-12))
            index = [self.names.index(n) for n in names]
            norms = torch.stack([_grad_norm(priors[n] * losses[n], parameters) for n in names])
            weighted = self.weights[index] * norms
            ratios = torch.tensor([float(losses[n].detach()) / self.initial[n] for n in names], device=norms.device)
            ratios = ratios / ratios.mean()
            target = (weighted.mean() * ratios.pow(self.alpha)).detach()
            self.optimizer.zero_grad()
            (weighted - target).abs().sum().backward(inputs=[self.weights])
            self.optimizer.step()
            with torch.no_grad():
                self.weights.clamp_(min=1e-3)
                self.weights.mul_(len(self.names) / self.weights.sum())
        return {n: priors[n] * float(self.weights[self.names.index(n)].detach()) for n in names}


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018): L = sum_i ½ e^{-σ_i} π_i L_i + ½ σ_i with learnable
    log-variances σ_i (trained with the NP parameters, no weight decay). Needs L_i ≥ 0."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def combine(self, losses: Mapping[str, torch.Tensor], priors: Mapping[str, float]) -> torch.Tensor:
        total = self.log_vars.new_zeros(())
        for name, loss in losses.items():
            sigma = self.log_vars[self.names.index(name)]
            total = total + 0.5 * torch.exp(-sigma) * priors[name] * loss + 0.5 * sigma
        return total

    def effective_weights(self, priors: Mapping[str, float], names: Iterable[str]) -> dict[str, float]:
        return {n: 0.5 * priors[n] * math.exp(-float(self.log_vars[self.names.index(n)].detach())) for n in names}


class OriginalAdaptiveWeighting:
    """The original code's `AdaptiveLossWeighting`, verbatim: the gradient of each loss with respect to *itself* is 1,
    so the weights are always uniform (1/n), whatever the losses."""

    def __init__(self, num_losses: int = 4) -> None:
        self.loss_weights = torch.ones(num_losses)
        self.grad_norms = torch.zeros(num_losses)
        self.alpha = 0.9

    def update_weights(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            for i, loss in enumerate(losses):
                grad = torch.autograd.grad(loss, loss, retain_graph=True)[0]
                self.grad_norms[i] = self.alpha * self.grad_norms[i] + (1 - self.alpha) * grad.norm()
            mean_norm = self.grad_norms.mean()
            self.loss_weights = mean_norm / (self.grad_norms + 1e-6)
            self.loss_weights = self.loss_weights / self.loss_weights.sum()
        return self.loss_weights


DEPRECATED_NAMES = {"SeedAdaptiveWeighting": "OriginalAdaptiveWeighting"}  # old name -> new name


def __getattr__(name: str) -> Any:
    if name in DEPRECATED_NAMES:
        warnings.warn(f"{name} is deprecated and will be removed; use {DEPRECATED_NAMES[name]}", FutureWarning,
                      stacklevel=2)
        return globals()[DEPRECATED_NAMES[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
