"""Recurrent (modal) decoding of the Toeplitz mixer against exact decoding: fit, agreement and speed.

    python -m training.train --model_type toeplitz_mixer --train_file tinystories_valid_sample.txt --block_size 512 \\
        --output_dir out/toeplitz --max_steps 300
    taskset -c 1 python -m benchmarks.toeplitz_recurrent --model out/toeplitz --threads 1 --compile
    python -m benchmarks.toeplitz_recurrent card model_cards/results/toeplitz_recurrent/smoke/toeplitz_recurrent.json  # the card

Quality (on the trained model `--model`, for every `--windows` × `--state_sizes` setting W, N of
`decode_mode="recurrent"`):
- kernel fit: `‖k − k̂‖ / ‖k‖` per head (taps < W exact), mean and max over layers and heads;
- teacher forcing on held-out text (the validation documents of the training run's split, packed into windows of
  the model's context): `--prompt_tokens` tokens prefilled, then one token at a time; KL(exact ‖ recurrent) of the
  next-token distributions and top-1 agreement, per position, mean ± standard error over the windows;
- greedy agreement: `--greedy_tokens` greedy tokens after each window's first `--prompt_tokens` tokens, the share of
  positions where recurrent and exact decoding give the same token and the mean length of their common prefix.
Speed (a model of the same shape with the context widened to the largest `--contexts` + `--new_tokens`, weights as
initialised: the cost does not depend on their values; FFT prefill): the decode step's time, `(T(new_tokens) −
T(1)) / (new_tokens − 1)` from greedy `generate` after a prompt of each context (median of `--runs`), exact against
recurrent, eagerly and (with `--compile`) compiled, and the cache's bytes.
Writes `toeplitz_recurrent.json` and `toeplitz_recurrent.png` into `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_models  # noqa: F401  (fills the registry)
from hf_models.toeplitz_mixer.recurrent_toeplitz_mixer import ToeplitzRecurrentCache
from training.common import UsageError, run_cli
from training.data import DataArguments, load_documents, tokenize_and_pack

from .decode import compile_config
from .harness import (
    MODEL_CARDS,
    card_markers,
    corpus_path,
    environment,
    figure_title,
    format_table,
    mean_and_se,
    output_folder,
    positive_ints,
    pyplot,
    random_prompts,
    save_figure,
    time_generation,
    torch_threads,
    update_card_from_json,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toeplitz_recurrent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained Toeplitz mixer folder")
    parser.add_argument("--heldout_file", default="tinystories_valid_sample.txt",
                        help="the training corpus, whose validation documents (split as the training CLI split them, "
                             "with the run's seed) are scored; a name is looked up in $HF_ZOO_DATA")
    parser.add_argument("--windows", type=lambda text: [int(v) for v in text.split(",")], default=[0, 16, 64],
                        help="exact taps W, comma-separated (0 allowed)")
    parser.add_argument("--state_sizes", type=positive_ints, default=[4, 16, 64], help="modes N, comma-separated")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--greedy_tokens", type=int, default=64)
    parser.add_argument("--max_windows", type=int, default=8, help="held-out windows scored")
    parser.add_argument("--contexts", type=positive_ints, default=[512, 2048, 8192])
    parser.add_argument("--speed_setting", default="16,16", help="W,N of the recurrent rows of the speed table")
    parser.add_argument("--batch_size", type=int, default=1, help="rows of the speed measurement")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled decoding (generate with a compile_config: the exact static step, "
                             "which reads all S slots, and the recurrent step)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--preset", default="smoke", help="names the run (the model's training budget)")
    parser.add_argument("--output_dir", default=None)
    return parser


def heldout_windows(model_dir: Path, source: str, length: int, count: int) -> torch.Tensor:
    """Up to `count` windows `(count, length)` of the validation documents of `source`, split as the training CLI
    split them (with the run's `seed` from `training_args.json`, else 42), tokenised by the model's tokenizer."""
    args_file = model_dir / "training_args.json"
    run_args = json.loads(args_file.read_text()) if args_file.exists() else {}
    documents = load_documents(DataArguments(train_file=str(corpus_path(source)), block_size=length),
                               seed=run_args.get("seed", 42))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = tokenize_and_pack(documents["validation"], tokenizer, length, split_name="validation")
    ids = torch.tensor(blocks.blocks["input_ids"][:count])
    if len(ids) == 0:
        raise UsageError(f"the validation split of {source} has fewer than {length} tokens")
    return ids


@torch.no_grad()
def teacher_forced(model: Any, windows: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities `(B, T − prompt, V)` of each next token: one call with an empty cache of the model's
    `decode_mode` for the first `prompt` tokens, then one token at a time (under exact decoding equal to the full
    forward)."""
    out = model(windows[:, :prompt], use_cache=True)
    cache, steps = out.cache, [out.logits[:, -1:]]
    for t in range(prompt, windows.shape[1] - 1):
        out = model(windows[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1).log_softmax(-1), cache


@torch.no_grad()
def greedy(model: Any, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompts.shape[1]:]


def quality(model: Any, windows: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (W, N): fit error, teacher-forced KL / top-1 agreement and greedy agreement against exact."""
    config = model.config
    greedy_prompts = windows[:, :args.prompt_tokens]
    config.decode_mode = "exact"
    exact_logp, _ = teacher_forced(model, windows, args.prompt_tokens)
    exact_greedy = greedy(model, greedy_prompts, args.greedy_tokens)
    rows = []
    settings = [(w, n) for w in args.windows for n in args.state_sizes]
    for window, size in tqdm(settings, desc="recurrent settings", unit="setting"):
        config.decode_mode, config.recurrent_window, config.recurrent_state_size = "recurrent", window, size
        start = time.perf_counter()
        errors = torch.cat([fit.relative_error for fit in model.model.recurrent_fit()])
        fit_seconds = time.perf_counter() - start
        logp, cache = teacher_forced(model, windows, args.prompt_tokens)
        assert isinstance(cache, ToeplitzRecurrentCache)
        kl = (exact_logp.exp() * (exact_logp - logp)).sum(-1).mean(-1)  # (B,): per window, mean over positions
        top1 = (exact_logp.argmax(-1) == logp.argmax(-1)).float().mean(-1)
        tokens = greedy(model, greedy_prompts, args.greedy_tokens)
        same = tokens == exact_greedy
        prefix = torch.where(same.all(-1), same.shape[1], (~same).float().argmax(-1)).float()
        kl_mean, kl_se = mean_and_se(kl.tolist())
        top1_mean, top1_se = mean_and_se(top1.tolist())
        rows.append({"window": window, "state_size": size, "fit_error_mean": errors.mean().item(),
                     "fit_error_max": errors.max().item(), "fit_seconds": fit_seconds,
                     "kl": kl_mean, "kl_se": kl_se, "top1_agreement": top1_mean, "top1_agreement_se": top1_se,
                     "greedy_agreement": same.float().mean().item(), "greedy_common_prefix": prefix.mean().item()})
    config.decode_mode = "exact"
    return rows


def cache_bytes(cache: Any) -> int:
    return sum(tensor.numel() * tensor.element_size() for layer in cache.layers for tensor in layer.states.values())


def speed(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode-step time of exact and recurrent decoding at each context, on a model widened to the contexts."""
    window, size = (int(v) for v in args.speed_setting.split(","))
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    config.max_position_embeddings = max(args.contexts) + args.new_tokens
    config.mixer_impl, config.recurrent_window, config.recurrent_state_size = "fft", window, size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    paths = {"eager": {}}
    if args.compile:
        paths["compiled"] = {"compile_config": compile_config(args.backend, model.device)}
    rows = []
    for context in tqdm(args.contexts, desc="speed", unit="context"):
        prompts = random_prompts(config.vocab_size, args.batch_size, context, device=model.device)
        for path, kwargs in paths.items():
            for mode in ("exact", "recurrent"):
                config.decode_mode = mode
                timings = {n: time_generation(model, prompts, new_tokens=n, use_cache=True, mode_kwargs=kwargs,
                                              runs=args.runs) for n in (args.new_tokens, 1)}
                step_ms = 1000 * (timings[args.new_tokens]["median_s"] - timings[1]["median_s"]) / (args.new_tokens - 1)
                with torch.no_grad():
                    cache = model(prompts[:, :1], use_cache=True).cache
                rows.append({"context": context, "path": path, "decode_mode": mode, "decode_step_ms": step_ms,
                             "cache_bytes": cache_bytes(cache), "timing": timings[args.new_tokens],
                             "prefill_timing": timings[1]})
            exact, recurrent = rows[-2], rows[-1]
            recurrent["speedup_vs_exact"] = exact["decode_step_ms"] / recurrent["decode_step_ms"]
    return rows


def log_ticks(axes: Any, values: Sequence[int]) -> None:
    """Ticks of a log x axis at the measured values only, as plain numbers (no overlapping minor labels)."""
    from matplotlib.ticker import NullLocator

    axes.set_xticks(list(values), [str(v) for v in values])
    axes.xaxis.set_minor_locator(NullLocator())


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for window in sorted({row["window"] for row in report["quality"]}):
        rows = [row for row in report["quality"] if row["window"] == window]
        left.errorbar([row["state_size"] for row in rows], [row["kl"] for row in rows],
                      yerr=[row["kl_se"] for row in rows], marker="o", capsize=3, label=f"W = {window} exact taps")
    left.set(xscale="log", yscale="log", xlabel="modes per head N", ylabel="KL(exact ‖ recurrent), nats/token",
             title="next-token KL on held-out text (± SE over windows)")
    log_ticks(left, sorted({row["state_size"] for row in report["quality"]}))
    left.legend(loc="best")
    for decode_path in dict.fromkeys(row["path"] for row in report["speed"]):
        for mode in ("exact", "recurrent"):
            rows = [row for row in report["speed"] if row["decode_mode"] == mode and row["path"] == decode_path]
            right.plot([row["context"] for row in rows], [row["decode_step_ms"] for row in rows], marker="o",
                       linestyle="-" if decode_path == "eager" else "--", label=f"{mode}, {decode_path}")
    right.set(xscale="log", xlabel="context (tokens in the cache)", ylabel="decode step, ms",
              title=f"decode step time, batch {report['settings']['batch_size']} (median of "
                    f"{report['settings']['runs']} runs)")
    log_ticks(right, sorted({row["context"] for row in report["speed"]}))
    right.legend(loc="best")
    env = report["environment"]
    fig.suptitle(figure_title("Toeplitz mixer recurrent decoding", report["settings"]["preset"],
                              report["model"]["steps"], env))
    return save_figure(fig, path)


CARD = MODEL_CARDS / "toeplitz_mixer.md"
QUALITY_COLUMNS = [("window", "W"), ("state_size", "N"), ("fit_error_mean", "fit error (mean)"),
                   ("fit_error_max", "fit error (max)"), ("kl", "KL nats/token"), ("kl_se", "± se"),
                   ("top1_agreement", "top-1 agreement"), ("greedy_agreement", "greedy tokens equal"),
                   ("greedy_common_prefix", "common prefix (tokens)")]
SPEED_COLUMNS = [("context", "context"), ("path", "path"), ("decode_mode", "decode"), ("decode_step_ms", "step ms"),
                 ("speedup_vs_exact", "÷ exact"), ("cache_bytes", "cache bytes"), ("noisy", "noisy (p90/p10 > 1.5)")]


def speed_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**row, "noisy": row["timing"]["noisy"] or row["prefill_timing"]["noisy"]} for row in report["speed"]]


def card_block(report: dict[str, Any], json_path: str) -> str:
    """The card's section, generated from a `toeplitz_recurrent.json` report (between `card_markers`)."""
    begin, end = card_markers("toeplitz_recurrent")
    return f"{begin.format(json=json_path)}\n\n{card_table(report)}\n\n{end}"


def summary_line(report: dict[str, Any]) -> str:
    """The findings in one paragraph, every figure read from the report."""
    quality, speed = report["quality"], report["speed"]
    largest = max(row["context"] for row in speed)
    lines = [f"Over the {len(quality)} settings: kernel fit error {min(r['fit_error_mean'] for r in quality):.3f}–"
             f"{max(r['fit_error_mean'] for r in quality):.3f} (mean over heads), next-token KL "
             f"{min(r['kl'] for r in quality):.2g}–{max(r['kl'] for r in quality):.2g} nats/token, top-1 agreement "
             f"≥ {min(r['top1_agreement'] for r in quality):.4f}, greedy tokens equal "
             f"{min(r['greedy_agreement'] for r in quality):.3f}–{max(r['greedy_agreement'] for r in quality):.3f}."]
    for path in dict.fromkeys(row["path"] for row in speed):
        rows = {(r["context"], r["decode_mode"]): r for r in speed if r["path"] == path}
        exact = [rows[(c, "exact")]["decode_step_ms"] for c in sorted({c for c, _ in rows})]
        recurrent = [rows[(c, "recurrent")]["decode_step_ms"] for c in sorted({c for c, _ in rows})]
        lines.append(f"{path.capitalize()}: the exact step takes {min(exact):.2f}–{max(exact):.2f} ms, the recurrent "
                     f"one {min(recurrent):.2f}–{max(recurrent):.2f} ms; at {largest} tokens of context the recurrent "
                     f"step is {rows[(largest, 'recurrent')]['speedup_vs_exact']:.2f}× faster, with a "
                     f"{rows[(largest, 'exact')]['cache_bytes'] / rows[(largest, 'recurrent')]['cache_bytes']:.0f}× "
                     "smaller cache.")
    return " ".join(lines)


def card_table(report: dict[str, Any]) -> str:
    """The card's Markdown tables, generated from a `toeplitz_recurrent.json` report."""
    env, settings = report["environment"], report["settings"]
    training = report["model"]["training"] or {}
    trained = (f"{report['model']['parameters']:,} parameters, {report['model']['steps']} training steps, "
               f"eval loss {training.get('eval_loss', float('nan')):.3f}. " if training else "")
    return (trained + f"Measured on {env['device_name']}, {env['torch_threads']} thread(s), {env['dtype']}; "
            f"{settings['windows_scored']} held-out windows of {settings['context']} tokens, "
            f"{settings['prompt_tokens']}-token prompts, {settings['greedy_tokens']} greedy tokens.\n\n"
            + format_table(report["quality"], QUALITY_COLUMNS, markdown=True) + "\n\n"
            + f"Speed: batch {settings['batch_size']}, {settings['new_tokens']} new tokens, recurrent W, N = "
              f"{settings['speed_setting']}.\n\n"
            + format_table(speed_rows(report), SPEED_COLUMNS, markdown=True) + "\n\n" + summary_line(report))


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = Path(args.model)
    with torch_threads(args.threads):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        if model.config.model_type != "toeplitz_mixer":
            raise UsageError(f"--model must be a Toeplitz mixer, got {model.config.model_type}")
        windows = heldout_windows(model_dir, args.heldout_file, model.config.max_position_embeddings,
                                  args.max_windows)
        results_file, state_file = model_dir / "all_results.json", model_dir / "trainer_state.json"
        report: dict[str, Any] = {
            "settings": {**vars(args), "context": model.config.max_position_embeddings,
                         "windows_scored": len(windows)},
            "model": {"parameters": model.num_parameters(), "config": model.config.to_diff_dict(),
                      "training": json.loads(results_file.read_text()) if results_file.exists() else None,
                      "steps": json.loads(state_file.read_text())["global_step"] if state_file.exists() else None},
            "environment": environment(model.device, model.dtype),
            "quality": quality(model, windows, args),
            "speed": speed(model_dir, args),
        }
    folder = output_folder(args.output_dir, "toeplitz_recurrent", args.preset)
    write_json(folder / "toeplitz_recurrent.json", report)
    plot(report, folder / "toeplitz_recurrent.png")
    print(card_table(report))
    print(f"wrote {folder}")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    def body(argv: Sequence[str] | None) -> dict[str, Any] | None:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["card"]:  # regenerate the card's section and the plot from a committed JSON
            print(update_card_from_json(argv[1], "toeplitz_recurrent", card_block, card=CARD))
            plot(json.loads(Path(argv[1]).read_text()), Path(argv[1]).with_suffix(".png"))
            return None
        return run(build_parser().parse_args(argv))

    return run_cli(body, argv)


if __name__ == "__main__":
    main()
