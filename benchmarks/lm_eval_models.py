"""The zoo's models for EleutherAI's lm-evaluation-harness, registered on import (`python -m benchmarks.lm_eval`
imports this module before it runs lm_eval's CLI).

`masked_diffusion` (`--model masked_diffusion --model_args pretrained=DIR,...`) evaluates a
`MaskedDiffusionForMaskedLM`. Its log-likelihoods are **bounds**, not exact: a masked diffusion model has no
tractable likelihood, so `loglikelihood` returns minus a Monte Carlo estimate of the negative ELBO of the
continuation given the context (`training.diffusion.nelbo_samples`: the bound the training objective minimises,
estimated with `mc_num` seeded samples; the standard error of every estimate goes into the results' `config`),
a lower bound on the log-likelihood in expectation. Perplexities and bits per byte computed from it by lm-eval are
therefore upper bounds, not comparable to a causal model's exact figures without that caveat.

* `loglikelihood`: the bound on `log p(continuation | context)`; `is_greedy` is whether greedy un-masking of the
  continuation, one most-confident token per step (LLaDA's check), reproduces it.
* `loglikelihood_rolling`: the bound summed over lm-eval's rolling windows (`lm_eval.utils.
  get_rolling_token_windows` with `rolling_context` tokens of context, EOS before the first window), each window
  (context + continuation) at most `max_length` tokens.
* `generate_until`: `diffusion_generate` of `max_gen_toks` tokens after the prompt (`sampler`, `steps`,
  `use_critic`, `temperature`, `top_p` as model arguments or generation arguments; `do_sample=False` is greedy),
  cut before the first stop sequence (the task's `until` and the EOS): a diffusion model fills its whole block
  at once, so stop sequences apply to the decoded block.

Model arguments: `pretrained` (folder or Hub id, required), `tokenizer`, `device`, `dtype`, `max_length`
(default `max_position_embeddings`), `mc_num` (default 128), `mc_form` (`count`, LLaDA's form, or `time`, MDLM's;
see `nelbo_samples`), `mc_seed` (default 1234), `min_mask_rate` (time form), `mc_batch_size` (sequences per
forward pass, default 64), `rolling_context` (default 1, as lm-eval's causal models), `sampler` (`auto`, `naive`,
`wavefront`), `steps` (default: one token per step), `use_critic`, `temperature` (default 0), `top_p`,
`max_gen_toks` (default 128), `seed` (generation, default 0), `trust_remote_code`.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval's own models first: registering into an empty registry hides them)
import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

import hf_models  # noqa: F401  (registers the zoo's architectures with the Auto classes)
from training.common import UsageError
from training.diffusion import ELBO_FORMS, nelbo_samples

logger = logging.getLogger(__name__)

GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "sampler", "steps", "use_critic")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("masked_diffusion")
class MaskedDiffusionLM(TemplateLM):
    """lm-eval model of the zoo's masked diffusion LM (see the module docstring for the arguments)."""

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        mc_num: int = 128,
        mc_form: str = "count",
        mc_seed: int = 1234,
        min_mask_rate: float = 1e-3,
        mc_batch_size: int = 64,
        rolling_context: int = 1,
        sampler: str = "auto",
        steps: int | None = None,
        use_critic: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_gen_toks: int = 128,
        seed: int = 0,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise UsageError(f"masked_diffusion: unknown model argument(s) {sorted(unknown)}; see "
                             "`python -m benchmarks.lm_eval --help` and benchmarks/lm_eval_models.py")
        if not pretrained:
            raise UsageError("masked_diffusion: pass --model_args pretrained=DIR (a masked diffusion model folder)")
        self.mc_num, self.mc_seed, self.mc_batch_size = int(mc_num), int(mc_seed), int(mc_batch_size)
        self.mc_form, self.min_mask_rate, self.rolling_context = mc_form, float(min_mask_rate), int(rolling_context)
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.generation = {"sampler": sampler, "steps": None if steps is None else int(steps),
                           "use_critic": _flag(use_critic), "temperature": float(temperature),
                           "top_p": float(top_p), "max_gen_toks": int(max_gen_toks)}
        self.seed = int(seed)
        if self.mc_num < 2:
            raise UsageError(f"masked_diffusion: mc_num must be at least 2 (the standard error needs two samples), "
                             f"got {mc_num}")
        if mc_form not in ELBO_FORMS:
            raise UsageError(f"masked_diffusion: mc_form must be one of {ELBO_FORMS}, got {mc_form!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"masked_diffusion: dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if self.mc_batch_size < 1 or self.batch_size < 1 or self.rolling_context < 1:
            raise UsageError("masked_diffusion: mc_batch_size, batch_size and rolling_context must be at least 1")

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                logger.warning("masked_diffusion: %s is not available, using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        remote = _flag(trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(pretrained, trust_remote_code=remote)
            if getattr(config, "mask_token_id", None) is None:
                raise UsageError(f"masked_diffusion: '{pretrained}' is a {config.model_type} model, not a masked "
                                 "diffusion model with a mask token; use --model hf for causal models")
            self.model = AutoModelForMaskedLM.from_pretrained(
                pretrained, config=config, dtype=getattr(torch, dtype), trust_remote_code=remote).to(self._device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or pretrained, trust_remote_code=remote)
        except (OSError, ValueError, AttributeError) as error:
            raise UsageError(f"masked_diffusion: could not load '{pretrained}': {str(error).splitlines()[0]}") from None
        if not hasattr(self.model, "diffusion_generate"):
            raise UsageError(f"masked_diffusion: '{pretrained}' loads as a {type(self.model).__name__}, which has no "
                             "diffusion_generate: not a masked diffusion model of the zoo")
        if self.tokenizer.eos_token_id is None:
            raise UsageError(f"masked_diffusion: the tokenizer of '{tokenizer or pretrained}' has no EOS token")
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.pretrained = pretrained
        self.mc_errors: dict[str, list[float]] = {"loglikelihood": [], "loglikelihood_rolling": []}
        self.rolling_bytes = 0

    # --- what TemplateLM needs --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # the zoo's data pipeline tokenizes documents without special tokens (the EOS is appended, not prepended)
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    # --- likelihood bounds --------------------------------------------------------------------------------------

    def _bounds(self, rows: Sequence[tuple[list[int], list[int]]]) -> tuple[list[float], list[float]]:
        """Mean and standard error (nats) of the negative-ELBO estimate of each `(context, continuation)` row; a
        row's masks come from a generator seeded by `mc_seed` and the row's tokens, so they do not depend on the
        batch or the order of the requests."""
        if not rows:
            return [], []
        tensors, generators = [], []
        for context, continuation in rows:
            if len(continuation) > self.max_length:
                raise UsageError(f"masked_diffusion: a continuation of {len(continuation)} tokens does not fit the "
                                 f"context of {self.max_length} tokens (max_length)")
            context = context[len(context) + len(continuation) - self.max_length:] \
                if len(context) + len(continuation) > self.max_length else context
            tensors.append((torch.tensor(context, dtype=torch.long), torch.tensor(continuation, dtype=torch.long)))
            # torch's CPU generator keeps 32 bits of a seed: one hash of the seed and the tokens
            generators.append(torch.Generator().manual_seed(zlib.crc32(repr((self.mc_seed, context,
                                                                             continuation)).encode())))
        samples = nelbo_samples(self.model, tensors, num_samples=self.mc_num, form=self.mc_form,
                                min_mask_rate=self.min_mask_rate, batch_size=self.mc_batch_size,
                                generators=generators)
        means = samples.mean(dim=1)
        errors = samples.std(dim=1) / math.sqrt(self.mc_num)
        return means.tolist(), errors.tolist()

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether greedy un-masking (one most confident token per step) fills `continuation` after `context`."""
        context = context[-(self.max_length - len(continuation)):] if self.max_length > len(continuation) else []
        prompt = torch.tensor([context], dtype=torch.long, device=self.device)
        filled = self.model.diffusion_generate(prompt, max_new_tokens=len(continuation), steps=len(continuation),
                                               sampler="naive", temperature=0.0)
        return filled[0, len(context):].tolist() == list(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        means, errors = self._bounds([(context, continuation) for _, context, continuation in requests])
        self.mc_errors["loglikelihood"].extend(errors)
        results = []
        for (pair, context, continuation), mean in zip(requests, means):
            answer = (-mean, self._is_greedy(context, continuation))
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=self.rolling_context,
            ):
                windows.append(lm_eval_utils.make_disjoint_window(window))
                owners.append(index)
            self.rolling_bytes += len(string.encode("utf-8"))
        means, errors = self._bounds(windows)
        totals, variances = [0.0] * len(requests), [0.0] * len(requests)
        for owner, mean, error in zip(owners, means, errors):
            totals[owner] -= mean
            variances[owner] += error ** 2
        self.mc_errors["loglikelihood_rolling"].extend(math.sqrt(v) for v in variances)
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise UsageError(f"masked_diffusion: unsupported generation argument(s) {unknown}; supported: "
                             f"{list(GENERATION_KEYS)}")
        settings = {**self.generation, **{k: v for k, v in gen_kwargs.items() if k not in ("until", "do_sample")}}
        if gen_kwargs.get("do_sample") is False:
            settings["temperature"] = 0.0
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tokenizer.decode([self.eot_token_id])
        return settings, until + ([eos] if eos not in until else [])

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            settings, until = self._generation_settings(dict(requests[indices[0]].args[1]))
            new_tokens = int(settings.pop("max_gen_toks"))
            steps = settings.pop("steps")
            steps = new_tokens if steps is None else min(int(steps), new_tokens)
            room = self.max_length - new_tokens
            if room < 0:
                raise UsageError(f"masked_diffusion: max_gen_toks={new_tokens} exceeds max_length={self.max_length}")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] if room else [] for i in chunk]
                width = max(len(prompt) for prompt in prompts)
                input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, prompt in enumerate(prompts):  # left padding
                    if prompt:
                        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                        attention_mask[row, width - len(prompt):] = 1
                try:
                    sequences = self.model.diffusion_generate(
                        input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                        max_new_tokens=new_tokens, steps=steps, seed=self.seed, **settings)
                except ValueError as error:
                    raise UsageError(f"masked_diffusion: {error}") from None
                for row, index in enumerate(chunk):
                    text = self.tokenizer.decode(sequences[row, width:].tolist(), skip_special_tokens=False)
                    cut = min((position for stop in until if (position := text.find(stop)) >= 0), default=len(text))
                    results[index] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[index].args, text[:cut])
        return results

    # --- what goes into the results -----------------------------------------------------------------------------

    def get_model_info(self) -> dict[str, Any]:
        """The Monte Carlo settings and standard errors, added to the results' `config` by lm-eval."""
        info: dict[str, Any] = {
            "likelihood": "bound: minus a Monte Carlo estimate of the negative ELBO (training.diffusion."
                          "nelbo_samples); perplexities and bits per byte are upper bounds",
            "mc_num": self.mc_num, "mc_form": self.mc_form, "mc_seed": self.mc_seed,
            "rolling_context": self.rolling_context, "max_length": self.max_length,
            "generation": self.generation, "generation_seed": self.seed,
        }
        if self.mc_errors["loglikelihood"]:
            errors = self.mc_errors["loglikelihood"]
            info["loglikelihood_mc_standard_error_nats"] = {"requests": len(errors), "mean": sum(errors) / len(errors),
                                                            "max": max(errors)}
        if self.mc_errors["loglikelihood_rolling"]:
            errors = self.mc_errors["loglikelihood_rolling"]
            total = math.sqrt(sum(error ** 2 for error in errors))
            info["loglikelihood_rolling_mc_standard_error"] = {
                "requests": len(errors), "total_nats": total,
                "bits_per_byte": total / (math.log(2) * max(self.rolling_bytes, 1)),
            }
        return info


__all__ = ["MaskedDiffusionLM"]
