"""Held-out fidelity of an NPT model to its base."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hf_models.npt import NPTForCausalLM

from .objective import NPTLossModule
from .teacher import capture_teacher


@torch.no_grad()
def evaluate_npt(model: NPTForCausalLM, blocks: Iterable[Mapping[str, Any]], batch_size: int = 8,
                 max_batches: int | None = None) -> dict[str, float]:
    """Held-out fidelity of an NPT model to its base on packed blocks (`input_ids`, optional `attention_mask`).

    Returns: `kl` (KL(teacher ‖ NPT), nats/token), `top1` (agreement of the argmax), `ppl_base`, `ppl_npt`,
    `ppl_drop` (NPT structure with the modulation off: replace → attention deleted), `recovery`
    R = (PPL_drop - PPL_npt)/(PPL_drop - PPL_base) (0: no better than deleting attention, 1: the base),
    `direct_nmse` and `s_var` (variance of the scalars s over valid tokens, first NPT layer, first projection),
    `cos_va_a` (the repository's attention similarity, mean cos(v_a, a)).
    """
    was_training = model.training
    model.eval()
    rows = list(blocks)
    totals = {"kl": 0.0, "top1": 0.0, "nll_base": 0.0, "nll_npt": 0.0, "nll_drop": 0.0, "err": 0.0, "ref": 0.0,
              "cos": 0.0, "tokens": 0.0, "targets": 0.0}
    scalars = []
    for batch_index, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            break
        batch = rows[start:start + batch_size]
        input_ids = torch.tensor([row["input_ids"] for row in batch], device=model.device)
        attention_mask = torch.tensor([row["attention_mask"] for row in batch], device=model.device) \
            if "attention_mask" in batch[0] else torch.ones_like(input_ids)
        mask = attention_mask.bool()
        teacher = capture_teacher(model, input_ids, attention_mask)
        student = model(input_ids, attention_mask=attention_mask, output_npt=True, use_cache=False)
        with model.npt_alpha(0.0):
            dropped = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        log_p = F.log_softmax(teacher.logits.float(), -1)
        log_q = F.log_softmax(student.logits.float(), -1)
        totals["kl"] += float(((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum())
        totals["top1"] += float(((log_p.argmax(-1) == log_q.argmax(-1)) & mask).sum())
        totals["tokens"] += float(mask.sum())
        targets = input_ids[:, 1:]
        target_mask = (mask[:, 1:] & mask[:, :-1]).float()
        for key, logits in (("nll_base", teacher.logits), ("nll_npt", student.logits), ("nll_drop", dropped)):
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            totals[key] += float((nll * target_mask).sum())
        totals["targets"] += float(target_mask.sum())
        for index, record in student.npt.items():
            target = NPTLossModule.direct_target(model, teacher.layers[index])
            totals["err"] += float(((record.mlp_output.float() - target.float()).pow(2).sum(-1) * mask).sum())
            totals["ref"] += float((target.float().pow(2).sum(-1) * mask).sum())
        first_layer = student.npt[min(student.npt)]
        proj = next(iter(first_layer.projections.values()))
        scalars.append(proj.s[..., 0].float()[mask])
        if proj.modulator.in_features == model.config.hidden_size:
            v_a = proj.modulator.vectors(proj.z)[0][..., 0, :]
            totals["cos"] += float((F.cosine_similarity(v_a.float(), first_layer.attn_output.float(), dim=-1)
                                    * mask).sum())
    model.train(was_training)
    ppl = {key: math.exp(totals[f"nll_{key}"] / max(totals["targets"], 1.0)) for key in ("base", "npt", "drop")}
    gap = ppl["drop"] - ppl["base"]
    s = torch.cat(scalars)
    return {
        "kl": totals["kl"] / totals["tokens"],
        "top1": totals["top1"] / totals["tokens"],
        "ppl_base": ppl["base"], "ppl_npt": ppl["npt"], "ppl_drop": ppl["drop"],
        "recovery": (ppl["drop"] - ppl["npt"]) / gap if abs(gap) > 1e-12 else float("nan"),
        "direct_nmse": totals["err"] / max(totals["ref"], 1e-12),
        "s_var": float(s.var()) if s.numel() > 1 else 0.0,
        "cos_va_a": totals["cos"] / totals["tokens"],
    }
