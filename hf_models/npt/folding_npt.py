"""Folding an NPT modulation into the base weights (seed 004's "permanent update"): read the modulation an NPT layer
applies at one token, turn it into a weight update `ΔW` with `ΔW q = α m`, add it, and revert it bit-exactly.
[`NPTForCausalLM`] inherits these methods from [`NPTFoldingMixin`]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

FOLD_MODES = ("raw", "minnorm", "covariance")


class NPTFoldingMixin:
    """The folding methods of [`NPTForCausalLM`] (they use its `_record_npt`, `model`, `config`, `npt_edit_log` and
    `_npt_originals`)."""

    @torch.no_grad()
    def extract_modulation(self, input_ids: torch.LongTensor, position: int = -1,
                           layers: Sequence[int] | None = None) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        """The modulation each NPT layer applies at one token of a single sequence.

        Args:
            input_ids: `(1, seq)`.
            position: the token whose modulation is extracted.
            layers: NPT layers to read (default: all).

        Returns:
            `{(layer, projection): {"q": (n_in,), "m": (n_out,), "v_a": (k, n_in), "v_b": (k, n_out)}}` in
            float32; `v_b` includes `np_alpha`, so `m = sum_j (v_a_j . q) v_b_j`.
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"extract_modulation reads one sequence, got a batch of {input_ids.shape[0]}")
        with self._record_npt() as records:
            self(input_ids)
        result = {}
        for index, record in records.items():
            if layers is not None and index not in layers:
                continue
            for name, proj in record.projections.items():
                v_a, v_b = proj.modulator.vectors(proj.z[0, position].float())
                result[(index, name)] = {"q": proj.q[0, position].float(), "m": proj.m[0, position].float(),
                                         "v_a": v_a, "v_b": self.config.np_alpha * v_b}
        return result

    @torch.no_grad()
    def mlp_input_covariance(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                             ridge: float = 1e-4) -> dict[tuple[int, str], torch.Tensor]:
        """`C = E[q qᵀ] + ridge·mean(diag)·I` of every modulated projection's input over the valid tokens (the key
        covariance of the `covariance` fold mode)."""
        with self._record_npt() as records:
            self(input_ids, attention_mask=attention_mask)
        valid = None if attention_mask is None else attention_mask.bool()
        result = {}
        for index, record in records.items():
            for name, proj in record.projections.items():
                q = (proj.q if valid is None else proj.q[valid]).reshape(-1, proj.q.shape[-1]).float()
                cov = q.T @ q / q.shape[0]
                result[(index, name)] = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0])
        return result

    @staticmethod
    def fold_delta(entry: dict[str, torch.Tensor], alpha: float = 1.0, mode: str = "minnorm",
                   covariance: torch.Tensor | None = None) -> torch.Tensor:
        """The weight update `ΔW` (n_out, n_in) that makes a modulation permanent; every mode gives `ΔW q = α m`.

        `raw`: `α sum_j v_b_j v_a_jᵀ`; `minnorm`: `α m qᵀ / ‖q‖²` (the smallest Frobenius norm with that action);
        `covariance` (ROME-style): `α m (C⁻¹q)ᵀ / (qᵀC⁻¹q)` (the least expected change on inputs distributed
        with second moment `C`).
        """
        q, m = entry["q"], entry["m"]
        if mode == "raw":
            return alpha * entry["v_b"].T @ entry["v_a"]
        if mode == "minnorm":
            return alpha * torch.outer(m, q) / q.dot(q)
        if mode == "covariance":
            if covariance is None:
                raise ValueError("fold mode 'covariance' needs the input covariance (`mlp_input_covariance`)")
            key = torch.linalg.solve(covariance.double(), q.double()).float()
            return alpha * torch.outer(m, key) / q.dot(key)
        raise ValueError(f"`mode` must be one of {FOLD_MODES}, got {mode!r}")

    @torch.no_grad()
    def fold_modulation(self, record: dict[tuple[int, str], dict[str, torch.Tensor]], alpha: float = 1.0,
                        mode: str = "minnorm",
                        covariances: dict[tuple[int, str], torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """Add the `fold_delta` of every entry of `record` (from `extract_modulation`) to the projection's weight
        (in float32, cast back) and append the edits to `npt_edit_log`. `revert_edits()` undoes them bit-exactly.

        A fold reproduces the modulation for that input `q` only; other tokens also see the update.
        """
        if mode not in FOLD_MODES:
            raise ValueError(f"`mode` must be one of {FOLD_MODES}, got {mode!r}")
        edits = []
        for (index, name), entry in record.items():
            linear = getattr(self.model.layers[index].mlp, f"{name}_proj")
            covariance = None if covariances is None else covariances.get((index, name))
            delta = self.fold_delta(entry, alpha, mode, covariance)
            self._npt_originals.setdefault((index, name), linear.weight.detach().clone())
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
            edit = {"layer": index, "projection": name, "alpha": alpha, "mode": mode,
                    "delta_norm": float(delta.norm()), "relative_norm": float(delta.norm() / linear.weight.norm())}
            edits.append(edit)
        self.npt_edit_log.extend(edits)
        return edits

    @torch.no_grad()
    def revert_edits(self) -> None:
        """Restore every folded weight to its value before the first fold (bit-identical)."""
        for (index, name), original in self._npt_originals.items():
            getattr(self.model.layers[index].mlp, f"{name}_proj").weight.copy_(original)
        self._npt_originals.clear()
        self.npt_edit_log.clear()


__all__ = ["FOLD_MODES", "NPTFoldingMixin"]
