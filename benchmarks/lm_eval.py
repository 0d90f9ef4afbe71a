"""EleutherAI's lm-evaluation-harness on the zoo's models: lm_eval's own command line, unchanged, with the zoo's
lm-eval models registered and its local tasks included.

    python -m benchmarks.lm_eval --model hf --model_args pretrained=out/llama,trust_remote_code=True \\
        --tasks zoo_heldout --heldout_file ../shared/data/tinyshakespeare.txt --output_path out/llama/lm_eval
    python -m benchmarks.lm_eval --model masked_diffusion --model_args pretrained=out/diffusion,mc_num=64 \\
        --tasks zoo_heldout,zoo_story_choice --heldout_file ../shared/data/tinyshakespeare.txt
    python -m benchmarks.lm_eval card out/llama        # the lm-eval figures of out/llama/lm_eval into its card

Every lm_eval option works (`python -m benchmarks.lm_eval run --help` lists them). Added on top:

* the model `masked_diffusion` (`benchmarks/lm_eval_models.py`; its likelihoods are ELBO bounds);
* `--include_path benchmarks/lm_eval_tasks` unless you pass your own (the tasks `zoo_heldout` and
  `zoo_story_choice`; with your own path, include the zoo's tasks by passing their YAML files to `--tasks`);
* `--heldout_file FILE` (with `--heldout_doc_separator`, `--heldout_text_column`): the text file `zoo_heldout`
  scores, split into documents as the training CLI splits `--train_file`; passed to the task as lm_eval
  `--metadata`;
* the sub-command `card MODEL_DIR [RESULTS.json ...]`: renders lm-eval result files (default: every
  `results_*.json` under `MODEL_DIR/lm_eval`, the latest per task) into the "lm-evaluation-harness" section of
  `MODEL_DIR/README.md`, with the lm_eval version and each task's settings.

A problem with the zoo's own arguments or its model's arguments stops with one `error:` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from training.common import UsageError, run_cli

TASKS_DIR = Path(__file__).resolve().with_name("lm_eval_tasks")
HELDOUT_OPTIONS = {"--heldout_file": "heldout_file", "--heldout_doc_separator": "heldout_doc_separator",
                   "--heldout_text_column": "heldout_text_column"}
RESULTS_FOLDER = "lm_eval"

HELP_PREAMBLE = f"""python -m benchmarks.lm_eval: lm_eval's command line with the hf-model-zoo's additions
  model  masked_diffusion (--model masked_diffusion --model_args pretrained=DIR,mc_num=128,...): ELBO bounds
  tasks  zoo_heldout, zoo_story_choice (from {TASKS_DIR}, included unless you pass --include_path)
  --heldout_file FILE [--heldout_doc_separator S] [--heldout_text_column C]: the text file zoo_heldout scores
  card MODEL_DIR [RESULTS.json ...]: write lm-eval results into MODEL_DIR's model card
lm_eval's own help follows ("run --help" lists every evaluation option).
"""


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove `name VALUE` / `name=VALUE` from `argv` and return the value (the last one given)."""
    value = None
    index = 0
    while index < len(argv):
        if argv[index] == name:
            if index + 1 >= len(argv):
                raise UsageError(f"{name} needs a value")
            value = argv[index + 1]
            del argv[index:index + 2]
        elif argv[index].startswith(name + "="):
            value = argv.pop(index).split("=", 1)[1]
        else:
            index += 1
    return value


def prepare_arguments(argv: Sequence[str]) -> list[str]:
    """lm_eval's arguments from the zoo's: the held-out options become `--metadata`, the zoo's task folder an
    `--include_path` (unless one is given).

    Raises:
        UsageError: `--heldout_file` names no file.
    """
    argv = list(argv)
    metadata = {key: value for option, key in HELDOUT_OPTIONS.items()
                if (value := _pop_option(argv, option)) is not None}
    if "heldout_file" in metadata and not Path(metadata["heldout_file"]).is_file():
        raise UsageError(f"--heldout_file {metadata['heldout_file']}: no such file")
    is_run = bool(argv) and argv[0] not in ("ls", "validate")
    if metadata:
        if not is_run:
            raise UsageError("--heldout_file and its options apply to an evaluation run only")
        argv += ["--metadata", json.dumps(metadata)]
    if argv and argv[0] not in ("-h", "--help") \
            and not any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    return argv


def run_lm_eval(argv: Sequence[str]) -> None:
    """Run lm_eval's CLI on `argv` (the zoo's options already translated) with the zoo's models registered."""
    from lm_eval.__main__ import cli_evaluate

    import benchmarks.lm_eval_models  # noqa: F401  (registers masked_diffusion)

    saved = sys.argv
    sys.argv = ["python -m benchmarks.lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def find_results(folder: Path) -> list[Path]:
    """lm-eval's aggregated result files (`results_*.json`) under `folder`, oldest first."""
    return sorted(folder.rglob("results_*.json"), key=lambda path: (path.stat().st_mtime, path.name))


def card_command(argv: Sequence[str]) -> None:
    """`card MODEL_DIR [RESULTS.json ...]`: the lm-eval section of MODEL_DIR's card from the result files."""
    from model_cards import update_lm_eval_section

    parser = argparse.ArgumentParser(prog="python -m benchmarks.lm_eval card",
                                     description=card_command.__doc__)
    parser.add_argument("model_dir", type=Path, help="a model folder with a model card (README.md)")
    parser.add_argument("results", type=Path, nargs="*",
                        help=f"lm-eval result JSON files (default: every results_*.json under MODEL_DIR/{RESULTS_FOLDER})")
    args = parser.parse_args(list(argv))
    paths = args.results or find_results(args.model_dir / RESULTS_FOLDER)
    if not paths:
        raise UsageError(f"no lm-eval results under {args.model_dir / RESULTS_FOLDER}: run the evaluation with "
                         f"--output_path {args.model_dir / RESULTS_FOLDER}, or pass the result files")
    results = []
    for path in paths:
        try:
            results.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"{path}: not a readable lm-eval result file ({error})") from None
    try:
        card = update_lm_eval_section(args.model_dir, results)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"wrote the lm-eval figures of {len(paths)} result file(s) into {card}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["card"]:
        card_command(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP_PREAMBLE)
    run_lm_eval(prepare_arguments(argv))


if __name__ == "__main__":
    run_cli(main)
