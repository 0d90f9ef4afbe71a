"""Model cards filled from real runs: Hub metadata, config, data, training, metrics, a sample, the loss curve,
benchmark and lm-evaluation-harness figures and the architecture's notes (`model_cards/<model_type>.md`, where
experiments record their verdicts)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import ModelCardData

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
LOSS_CURVE_FILE = "loss_curve.png"
BENCHMARK_FILE = "benchmark.json"


def architecture_notes(model_type: str) -> str:
    """The architecture's notes (`model_cards/<model_type>.md`), or an empty string."""
    path = _HERE / f"{model_type}.md"
    return path.read_text(encoding="utf-8").strip() if path.exists() else ""


def plot_loss_curve(log_history: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> bool:
    """Plot training (and evaluation) loss against the step from a Trainer's `log_history`, titled `title` (what was
    trained, how long, on what).

    Returns:
        Whether the PNG was written (`False` when matplotlib is not installed or nothing was logged).
    """
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evals:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve written (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _table(rows: Mapping[str, Any]) -> str:
    return "\n".join(f"| {key} | {_format(value)} |" for key, value in rows.items())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def _benchmark_section(folder: Path) -> str:
    path = folder / BENCHMARK_FILE
    if not path.exists():
        return ""
    report = json.loads(path.read_text())
    lines = ["## Generation speed", "", f"Measured with `python -m benchmarks.generation` on {report['environment']['device_name']} "
             f"({report['environment']['dtype']}, torch {report['environment']['torch']}).", "",
             "| model | mode | batch | prompt | new tokens | cached tok/s | uncached tok/s |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['batch_size']} | {row['prompt_length']} | {row['new_tokens']} "
            f"| {_format(row.get('cached_tokens_per_second', '—'))} | {_format(row.get('uncached_tokens_per_second', '—'))} |"
        )
    return "\n".join(lines)


_BENCHMARK_START, _BENCHMARK_END = "<!-- benchmark:start -->\n", "\n<!-- benchmark:end -->"


def update_benchmark_section(folder: str | Path) -> bool:
    """Re-render the generation-speed section of `folder/README.md` from `folder/benchmark.json`.

    Returns:
        Whether a card with a benchmark section was found and updated.
    """
    card = Path(folder) / "README.md"
    if not card.exists():
        return False
    text = card.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(_BENCHMARK_START.strip()) + ".*?" + re.escape(_BENCHMARK_END.strip()), flags=re.DOTALL)
    if not pattern.search(text):
        return False
    section = _BENCHMARK_START + _benchmark_section(Path(folder)) + _BENCHMARK_END
    card.write_text(pattern.sub(lambda _: section, text), encoding="utf-8")
    return True


_LM_EVAL_START, _LM_EVAL_END = "<!-- lm_eval:start -->\n", "\n<!-- lm_eval:end -->"


def _lm_eval_settings(task: str, result: Mapping[str, Any]) -> str:
    config = result.get("configs", {}).get(task, {})
    samples = result.get("n-samples", {}).get(task, {})
    parts = [f"{config.get('output_type', '?')}", f"{result.get('n-shot', {}).get(task, 0)}-shot"]
    if samples:
        parts.append(f"{samples.get('effective'):,} of {samples.get('original'):,} documents")
    metadata = config.get("metadata") or {}
    if metadata.get("heldout_file"):
        parts.append(f"`{Path(str(metadata['heldout_file'])).name}` (documents split "
                     f"{metadata.get('heldout_doc_separator', 'auto')})")
    parts.append(f"task version {result.get('versions', {}).get(task, '?')}")
    return ", ".join(parts)


def lm_eval_section(results: Sequence[Mapping[str, Any]]) -> str:
    """The "lm-evaluation-harness" card section from lm-eval result dicts (its `results_*.json` files), oldest
    first: for each task the latest run, with lm_eval's version, the model arguments and the task's settings."""
    latest: dict[str, int] = {}
    for index, result in enumerate(results):
        for task in result.get("results", {}):
            latest[task] = index
    lines = ["## lm-evaluation-harness", ""]
    for index, result in enumerate(results):
        tasks = sorted(task for task, owner in latest.items() if owner == index)
        if not tasks:
            continue
        config = result.get("config", {})
        model_args = config.get("model_args") or {}
        if isinstance(model_args, str):
            model_args = dict(item.split("=", 1) for item in model_args.split(",") if "=" in item)
        shown = ", ".join(f"{key}={value}" for key, value in model_args.items() if key != "pretrained") or "defaults"
        lines += [f"Measured with `python -m benchmarks.lm_eval` (lm_eval {result.get('lm_eval_version', '?')}, "
                  f"`--model {config.get('model', '?')}`, model arguments: {shown}; device {config.get('device')}, "
                  f"limit {config.get('limit')}).", "",
                  "| task | metric | value | ± |", "|---|---|---|---|"]
        for task in tasks:
            for key, value in result["results"][task].items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filter_name = key.split(",", 1)
                error = result["results"][task].get(f"{metric}_stderr,{filter_name}")
                lines.append(f"| {task} | {metric} | {_format(value)} | "
                             f"{_format(error) if isinstance(error, float) else '—'} |")
        lines += ["", *(f"- `{task}`: {_lm_eval_settings(task, result)}" for task in tasks)]
        if "likelihood" in config:  # the zoo's masked_diffusion model: bounds, with their Monte Carlo error
            rolling = config.get("loglikelihood_rolling_mc_standard_error")
            lines += ["", f"These log-likelihoods are **bounds**, not exact ({config['likelihood']}; mc_num="
                          f"{config.get('mc_num')}, form {config.get('mc_form')}, seed {config.get('mc_seed')})."
                      + (f" Monte Carlo standard error of the bits per byte: {_format(rolling['bits_per_byte'])}."
                         if rolling else "")]
        lines.append("")
    return "\n".join(lines).strip()


def update_lm_eval_section(folder: str | Path, results: Sequence[Mapping[str, Any]]) -> Path:
    """Write the lm-evaluation-harness section (see `lm_eval_section`) into `folder/README.md`, replacing the
    previous one; a card without the section gets it before the architecture notes.

    Raises:
        ValueError: `folder` has no model card.
    """
    card = Path(folder) / "README.md"
    if not card.is_file():
        raise ValueError(f"{card} not found: the lm-eval figures go into an existing model card (a folder written "
                         "by the training CLI)")
    text = card.read_text(encoding="utf-8")
    section = _LM_EVAL_START + lm_eval_section(results) + _LM_EVAL_END
    pattern = re.compile(re.escape(_LM_EVAL_START.strip()) + ".*?" + re.escape(_LM_EVAL_END.strip()), flags=re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        anchor = next((heading for heading in ("\n## About the architecture", "\n## Limitations") if heading in text),
                      None)
        text = text.replace(anchor, f"\n{section}\n{anchor}", 1) if anchor else f"{text.rstrip()}\n\n{section}\n"
    card.write_text(text, encoding="utf-8")
    return card


def write_model_card(
    folder: str | Path,
    *,
    model_type: str,
    description: str,
    auto_class: str,
    config: Mapping[str, Any],
    num_parameters: int,
    num_trainable: int,
    training: Mapping[str, Any],
    metrics: Mapping[str, Any],
    sample_prompt: str,
    sample_text: str,
    sample_settings: str,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    repo_id: str | None = None,
    bpb_note: str = "",
) -> Path:
    """Write `README.md` (the model card) into `folder` and return its path.

    The loss curve is shown if `loss_curve.png` is in `folder`, benchmark figures if `benchmark.json` is, and
    the architecture's notes if `model_cards/<model_type>.md` exists. The lm-evaluation-harness section starts
    empty (a new run's card never shows an older model's figures); `update_lm_eval_section` fills it.
    """
    folder = Path(folder)
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation" if auto_class == "AutoModelForCausalLM" else "fill-mask",
        tags=["hf-model-zoo", model_type, *tags],
        datasets=[name for name in datasets if "/" in name] or None,
    )
    loss_curve = (
        f"## Loss curve\n\n![loss curve]({LOSS_CURVE_FILE})" if (folder / LOSS_CURVE_FILE).exists() else ""
    )
    notes = architecture_notes(model_type)
    text = Template((_HERE / "templates" / "model_card.md").read_text(encoding="utf-8")).substitute(
        metadata=card_data.to_yaml(),
        title=folder.name if folder.name == model_type else f"{folder.name} ({model_type})",
        description=description,
        auto_class=auto_class,
        repo_id=repo_id or folder.name,
        config_table=_table(config),
        num_parameters=f"{num_parameters:,}",
        num_trainable=f"{num_trainable:,}",
        training_table=_table(training),
        metrics_table=_table(metrics),
        bpb_note=bpb_note,
        sample_prompt=sample_prompt,
        sample_settings=sample_settings,
        sample_text=sample_text,
        loss_curve=loss_curve,
        benchmarks=_BENCHMARK_START + _benchmark_section(folder) + _BENCHMARK_END,
        lm_eval=_LM_EVAL_START + _LM_EVAL_END,  # filled by `python -m benchmarks.lm_eval card`
        architecture_notes=f"## About the architecture\n\n{notes}" if notes else "",
    )
    path = folder / "README.md"
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines()))
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path
