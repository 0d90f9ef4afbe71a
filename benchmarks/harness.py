"""The zoo's measurement harness: timed runs with warm-up, medians and spread, fixed-length generation, training
throughput, and the environment every report records; and the scaffolding every experiment shares (one `--set
key=value` override syntax, `torch_threads`, the default output folder, `TrainingArguments` defaults, one figure
saver, mean and standard error).

Figures are measured, never assumed: each timing is `time.perf_counter` around the call with the device
synchronised before and after (CUDA), after `warmup` untimed calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, TrainingArguments

from hf_models.registry import parse_config_overrides
from training.common import UsageError, device_name
from training.data import DataArguments, default_data_dir, load_documents, tokenize_and_pack
from training.tokenization import train_bpe_tokenizer

NOISY_SPREAD = 1.5  # a timing whose p90 / p10 exceeds this is marked noisy
MIN_RUNS = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_ints(text: str) -> list[int]:
    """argparse type: `"1,4,16"` -> `[1, 4, 16]`, every value >= 1."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def positive_floats(text: str) -> list[float]:
    """argparse type: `"0.9,0.5"` -> `[0.9, 0.5]`, every value > 0 (an empty string: no value)."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got '{text}'")
    return values


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock seconds of the timed runs."""

    seconds: list[float]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.seconds)
        position = q * (len(ordered) - 1)
        low, high = int(position), min(int(position) + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    def summary(self) -> dict[str, float | int | bool]:
        """Median, mean, p10, p90, min, max (seconds), the number of runs, the spread p90 / p10 and whether it
        exceeds `NOISY_SPREAD` (the timing is then marked noisy in tables)."""
        spread = self.quantile(0.9) / self.quantile(0.1) if self.quantile(0.1) > 0 else float("inf")
        return {
            "spread_p90_p10": spread,
            "noisy": spread > NOISY_SPREAD,
            "median_s": self.median,
            "mean_s": self.mean,
            "p10_s": self.quantile(0.1),
            "p90_s": self.quantile(0.9),
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "runs": len(self.seconds),
        }


def time_runs(fn: Callable[[], Any], *, device: torch.device, warmup: int = 1, runs: int = 5) -> Timing:
    """Call `fn` `warmup` times untimed, then time `runs` calls (at least `MIN_RUNS`, so a median and a spread
    exist)."""
    if runs < MIN_RUNS:
        raise ValueError(f"runs must be >= {MIN_RUNS}, got {runs}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


def measure_memory_bandwidth(device: torch.device, megabytes: int = 256, runs: int = 5) -> float:
    """Achievable memory bandwidth of `device` in GB/s: bytes read plus written by copying a `megabytes` float32
    buffer into another (median of `runs`), with the current torch threads. The reference for "fraction of the
    memory-bandwidth floor" figures; a vendor's peak is higher."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    timing = time_runs(lambda: target.copy_(source), device=device, warmup=1, runs=max(runs, MIN_RUNS))
    return 2 * source.numel() * source.element_size() / timing.median / 1e9


def git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a figure depends on: device, dtype, library versions, threads, revision."""
    name = device_name(device)
    return {
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),  # 1, 5, 15 minutes: other work on the machine while measuring
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_revision": git_revision(),
    }


def random_prompts(
    vocab_size: int, batch_size: int, length: int, *, device: torch.device, seed: int = 0, low: int = 0
) -> torch.Tensor:
    """Seeded random token ids in `[low, vocab_size)` of shape `(batch, length)`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch_size, length), generator=generator).to(device)


def time_generation(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    new_tokens: int,
    use_cache: bool | None,
    method: str = "generate",
    mode_kwargs: Mapping[str, Any] | None = None,
    warmup: int = 1,
    runs: int = 5,
) -> dict[str, Any]:
    """Time greedy generation of exactly `new_tokens` tokens per row (EOS does not stop it).

    `use_cache=None` leaves the method's own caching choice (for generators without a cache switch).

    Returns:
        `tokens_per_second` (batch × new tokens / median seconds), `ms_per_token` (median seconds per decode
        step, whole batch) and the timing summary.

    Raises:
        RuntimeError: the output does not have the requested length.
    """
    kwargs: dict[str, Any] = dict(mode_kwargs or {})
    kwargs["max_new_tokens"] = new_tokens
    if method == "generate":
        kwargs.update(do_sample=False, eos_token_id=None,
                      pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    if use_cache is not None:
        kwargs["use_cache"] = use_cache
    attention_mask = torch.ones_like(input_ids)
    generate = getattr(model, method)
    lengths = []

    @torch.no_grad()
    def run() -> None:
        output = generate(input_ids, attention_mask=attention_mask, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        lengths.append(sequences.shape[-1])

    timing = time_runs(run, device=input_ids.device, warmup=warmup, runs=runs)
    expected = input_ids.shape[1] + new_tokens
    if any(length != expected for length in lengths):
        raise RuntimeError(f"generation produced lengths {sorted(set(lengths))}, expected {expected}")
    batch = input_ids.shape[0]
    return {
        "tokens_per_second": batch * new_tokens / timing.median,
        "ms_per_token": 1000 * timing.median / new_tokens,
        **timing.summary(),
    }


def time_training(
    model: PreTrainedModel,
    *,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 1,
    runs: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one training step (forward, backward, AdamW step) on random tokens; tokens/s from the median."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = random_prompts(model.config.vocab_size, batch_size, seq_len, device=device, seed=seed)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_runs(step, device=device, warmup=warmup, runs=runs)
    model.eval()
    return {"tokens_per_second": batch_size * seq_len / timing.median, **timing.summary()}


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def worst_spread(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A table row's timing columns from the `Timing.summary()`s it is made of: the largest p90/p10 and `"noisy"`
    when any of them is noisy (else `""`)."""
    return {"spread_p90_p10": max(summary["spread_p90_p10"] for summary in summaries),
            "noisy": "noisy" if any(summary["noisy"] for summary in summaries) else ""}


def format_table(rows: list[Mapping[str, Any]], columns: list[tuple[str, str]], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table of `rows` with `(key, header)` columns; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join([*lines, *("| " + " | ".join(line) + " |" for line in body)])
    widths = [max(len(header), *(len(line[i]) for line in body)) for i, (_, header) in enumerate(columns)]
    lines = ["  ".join(header.ljust(width) for (_, header), width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.ljust(width) for value, width in zip(line, widths)) for line in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Experiment scaffolding


RENAMED_PRESETS = {"seed": "original", "seed_readme": "original_readme"}  # old name -> new (the research code's)


def add_preset_argument(parser: argparse.ArgumentParser, presets: Mapping[str, Any], default: str = "smoke") -> None:
    """`--preset NAME` from `presets`; a renamed preset's old name (`RENAMED_PRESETS`) still works, with a
    FutureWarning."""

    def preset(name: str) -> str:
        new = RENAMED_PRESETS.get(name)
        if new in presets and name not in presets:
            warnings.warn(f"--preset {name} is deprecated, use --preset {new}", FutureWarning, stacklevel=2)
            return new
        return name

    parser.add_argument("--preset", type=preset, choices=sorted(presets), default=default)


def add_set_argument(parser: argparse.ArgumentParser, what: str = "preset fields") -> None:
    """`--set KEY=VALUE[,KEY=VALUE...]` (repeatable; later items win): the one override syntax of every experiment.
    Values are read as in `parse_config_overrides` (JSON where possible: `max_steps=100`, `seeds=[0,1]`)."""
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help=f"Change {what}, e.g. --set max_steps=100 (repeatable).")


class _DeprecatedAlias(argparse.Action):
    """An old override flag kept as an alias of `--set`: warns (FutureWarning) and appends to `--set`."""

    def __init__(self, option_strings: Sequence[str], dest: str, key: str | None = None, prefix: str = "",
                 **kwargs: Any) -> None:
        self.key, self.prefix = key, prefix
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        replacement = f"--set {self.key}=..." if self.key else f"--set {self.prefix}KEY=VALUE,..."
        warnings.warn(f"{option_string} is deprecated, use {replacement}", FutureWarning, stacklevel=2)
        items = list(getattr(namespace, "set", None) or [])
        if self.key:
            items.append({self.key: values})
        else:
            items.append({self.prefix + key: value for key, value in parse_set([values]).items()})
        namespace.set = items


def add_deprecated_override(parser: argparse.ArgumentParser, flag: str, prefix: str = "") -> None:
    """`flag "k=v,..."` (an old override flag such as `--config_overrides`) keeps working as
    `--set "<prefix>k=v,..."`."""
    parser.add_argument(flag, action=_DeprecatedAlias, dest="_deprecated_" + flag.lstrip("-"), prefix=prefix,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_deprecated_settings(parser: argparse.ArgumentParser, types: Mapping[str, Callable[[str], Any]],
                            keys: Mapping[str, str] | None = None) -> None:
    """`--name VALUE` for each setting `name` (the old one-flag-per-setting spelling) keeps working as
    `--set key=VALUE` (`key`: `keys[name]`, default `name`), the value parsed by its `types[name]`."""
    for name, kind in types.items():
        parser.add_argument(f"--{name}", action=_DeprecatedAlias, key=(keys or {}).get(name, name), type=kind,
                            dest="_deprecated_" + name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def parse_set(items: Sequence[str | Mapping[str, Any]] | None) -> dict[str, Any]:
    """The overrides of `--set` (and its deprecated aliases) merged in order.

    Raises:
        UsageError: an item is not `key=value` (one line naming it).
    """
    result: dict[str, Any] = {}
    for item in items or ():
        if isinstance(item, Mapping):
            result.update(item)
            continue
        try:
            result.update(parse_config_overrides(item))
        except ValueError as error:
            raise UsageError(f"--set: {error}") from None
    return result


def apply_settings(defaults: Mapping[str, Any], items: Sequence[str | Mapping[str, Any]] | None,
                   what: str = "preset field") -> dict[str, Any]:
    """`defaults` updated by `--set`; an unknown key is a `UsageError` listing the known ones."""
    overrides = parse_set(items)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UsageError(f"--set: unknown {what}(s) {unknown}; known: {', '.join(sorted(defaults))}")
    return {**defaults, **overrides}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch threads (None or 0: unchanged), restoring the previous count on exit,
    also after an exception."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timestamp() -> str:
    """The local time as the results folders name it, `YYYY-MM-DD_HH-MM-SS`."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}"


def output_folder(given: str | None, *name: Any) -> Path:
    """`given`, or `results/<name[0]>-<name[1]>-...-<timestamp>` (e.g. `results/dual_head-smoke-<timestamp>`)."""
    return Path(given or f"results/{'-'.join(map(str, name))}-{timestamp()}")


def training_arguments(output_dir: str | Path, *, device: torch.device, seed: int, **fields: Any) -> TrainingArguments:
    """`TrainingArguments` with the experiments' defaults (no checkpoints, no reporting, no pinned memory, `use_cpu`
    when `device` is the CPU); `fields` set or override the rest."""
    defaults: dict[str, Any] = dict(save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
                                    dataloader_pin_memory=False, seed=seed)
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **fields})


def corpus_path(train_file: str | Path) -> Path:
    """`train_file` as given when it exists or is absolute, else the file of that name in the data folder
    (`$HF_ZOO_DATA`, default `../shared/data`)."""
    path = Path(train_file)
    return path if path.exists() or path.is_absolute() else default_data_dir() / path


def prepare_corpus(train_file: str | Path, *, vocab_size: int, block_size: int,
                   max_train_documents: int | None = None) -> dict[str, Any]:
    """The experiments' data: documents split as the training CLI splits them (seed 0), a BPE tokenizer of
    `vocab_size` fitted on the training documents, and both splits packed into `block_size` blocks.

    Returns:
        `documents`, `tokenizer`, `train` and `validation` (packed splits) and `train_file` (the resolved path).
    """
    path = corpus_path(train_file)
    documents = load_documents(DataArguments(train_file=str(path), block_size=block_size,
                                             max_train_documents=max_train_documents), seed=0)
    tokenizer = train_bpe_tokenizer(documents["train"]["text"], vocab_size=vocab_size)
    return {"documents": documents, "tokenizer": tokenizer, "train_file": str(path),
            "train": tokenize_and_pack(documents["train"], tokenizer, block_size, split_name="train"),
            "validation": tokenize_and_pack(documents["validation"], tokenizer, block_size, split_name="validation")}


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def pyplot() -> Any:
    """`matplotlib.pyplot` on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hardware(env: Mapping[str, Any]) -> str:
    """`<device name>[ (<device>)], <n> thread(s)[, load <1-minute load>]` from an `environment()` record (older
    records may lack the device or the load)."""
    load, device = env.get("load_average"), env.get("device")
    return (f"{env.get('device_name', device or '?')}" + (f" ({device})" if device else "")
            + f", {env.get('torch_threads', '?')} thread(s)" + (f", load {load[0]:.1f}" if load else ""))


def figure_title(what: str, preset: str | None, steps: int | None, env: Mapping[str, Any]) -> str:
    """A figure's title: what it shows, then the preset, the training steps (each left out when `None`) and the
    hardware of `env` (an `environment()` record)."""
    details = [f"preset {preset}"] * (preset is not None) + [f"{steps} steps"] * (steps is not None)
    return f"{what}\n" + ", ".join([*details, hardware(env)])


def outside_legend(ax: Any, **kwargs: Any) -> Any:
    """A legend to the right of `ax`, outside the axes, so that it covers neither the data nor another legend."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kwargs)


def rate_errors(rates: Sequence[float], timings: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Asymmetric error bars `[below, above]` of rates `work / median seconds` from their timings' p90 / p10 (a
    slower run gives a lower rate), for `errorbar(yerr=...)`."""
    below = [rate - rate * timing["median_s"] / timing["p90_s"] for rate, timing in zip(rates, timings)]
    above = [rate * timing["median_s"] / timing["p10_s"] - rate for rate, timing in zip(rates, timings)]
    return [below, above]


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out `fig`, write it to `path` (creating the folder; the bounding box takes in legends outside the
    axes) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"


def card_markers(experiment: str) -> tuple[str, str]:
    """The comments around an experiment's generated section of a card (the first names its JSON: `{json}`)."""
    return f"<!-- {experiment} results: generated from {{json}} -->", f"<!-- end of {experiment} results -->"


def replace_card_section(card: Path, experiment: str, block: str) -> None:
    """Put `block` (which starts and ends with `card_markers(experiment)`) in place of the card's section of that
    experiment, or append it."""
    begin, end = card_markers(experiment)
    begin = begin.split("{json}")[0]
    text = card.read_text(encoding="utf-8")
    if begin in text:
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + block + text[stop:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    card.write_text(text, encoding="utf-8")


def run_section(benchmark: str, json_path: str | Path) -> str:
    """The card-section name of one run of a benchmark whose JSON lies in its own folder: `"<benchmark> <folder>"`
    (e.g. `decode bicameral_lm`), so one card can hold several runs."""
    return f"{benchmark} {Path(json_path).parent.name}"


def update_card_from_json(json_path: str | Path, experiment: str,
                          card_block: Callable[[dict[str, Any], str], str], card: Path | None = None) -> str:
    """Render `card_block(report, json path relative to the repository)` from the JSON at `json_path` and put it in
    place of the card's `experiment` section; the card is `card`, else `model_cards/<report's model_type>.md`."""
    json_path = Path(json_path)
    report = json.loads(json_path.read_text(encoding="utf-8"))
    block = card_block(report, json_path.resolve().relative_to(MODEL_CARDS.parent).as_posix())
    replace_card_section(card or MODEL_CARDS / f"{report['model_type']}.md", experiment, block)
    return block


def environment_line(env: Mapping[str, Any]) -> str:
    """`Measured on <device>, <n> thread(s), <dtype>, torch <version>` from an `environment()` record."""
    load = f", 1-minute load {env['load_average'][0]:.2f}" if env.get("load_average") else ""
    return (f"Measured on {env['device_name']}, {env['torch_threads']} thread(s), {env['dtype']}, torch "
            f"{env['torch']}{load}")


def generated_section(benchmark: str, json_path: str, *parts: str) -> str:
    """A card section of one run of `benchmark` (see `run_section`): the markers naming `json_path` around
    `parts`, separated by blank lines."""
    begin, end = card_markers(run_section(benchmark, json_path))
    return "\n\n".join([begin.format(json=json_path), *parts, end])


def card_command(argv: Sequence[str], benchmark: str, card_block: Callable[[dict[str, Any], str], str]) -> bool:
    """Handle `python -m benchmarks.<benchmark> card <json>` (regenerate the run's card section and print it);
    whether `argv` was that command."""
    if argv[:1] != ["card"]:
        return False
    print(update_card_from_json(argv[1], run_section(benchmark, argv[1]), card_block))
    return True

