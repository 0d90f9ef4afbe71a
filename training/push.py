"""Push a trained folder (model, tokenizer, modeling code, card, plots, metrics) to the Hub, or write the same
repository layout to a local folder.

    python -m training.push --checkpoint out/llama --repo_id user/name
    python -m training.push --checkpoint out/llama --repo_id user/name --local_dir hub_copy/

The model and tokenizer are loaded and saved again, so the repository holds exactly what `from_pretrained`
needs (safetensors weights, remote code), never optimizer states or pickled training arguments.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser

import hf_models  # noqa: F401  (registers the zoo's architectures)
from hf_models.registry import get_spec
from model_cards import BENCHMARK_FILE, LOSS_CURVE_FILE

from .common import UsageError, run_cli
from .tokenization import record_model_max_length
from .train import WEIGHT_FILES

CARD_FILE = "README.md"
EXTRA_FILES = (CARD_FILE, LOSS_CURVE_FILE, BENCHMARK_FILE, "all_results.json")


@dataclass
class PushArguments:
    """What to push and where."""

    checkpoint: str = field(metadata={"help": "Folder written by `python -m training.train` (or any save_pretrained)."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. user/name."})
    local_dir: str | None = field(
        default=None, metadata={"help": "Write the repository layout into this folder instead of uploading."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    commit_message: str = field(default="Upload model trained with hf-model-zoo", metadata={"help": "Commit message."})


def stage_repository(checkpoint: str | Path, staging: str | Path, repo_id: str | None = None) -> list[str]:
    """Write the Hub repository layout of `checkpoint` into `staging` and return the file names.

    Raises:
        UsageError: the folder is missing, has no weights or config, or is of an unknown architecture.
    """
    checkpoint, staging = Path(checkpoint), Path(staging)
    if not checkpoint.is_dir():
        raise UsageError(f"checkpoint folder not found: {checkpoint}")
    if not any((checkpoint / name).exists() for name in WEIGHT_FILES):
        raise UsageError(f"checkpoint folder {checkpoint} has no weights ({' or '.join(WEIGHT_FILES)})")
    if not (checkpoint / "config.json").exists():
        raise UsageError(f"checkpoint folder {checkpoint} has no config.json")
    config = AutoConfig.from_pretrained(checkpoint)
    try:
        spec = get_spec(config.model_type)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model = spec.model_class.from_pretrained(checkpoint)
    model.save_pretrained(staging)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError):
        raise UsageError(f"checkpoint folder {checkpoint} has no loadable tokenizer") from None
    record_model_max_length(tokenizer, spec, model.config)
    tokenizer.save_pretrained(staging)
    for name in EXTRA_FILES:
        if (checkpoint / name).exists():
            shutil.copyfile(checkpoint / name, staging / name)
    card = staging / CARD_FILE
    if repo_id and card.exists():
        text = card.read_text(encoding="utf-8")
        card.write_text(re.sub(r'from_pretrained\("[^"]*"', f'from_pretrained("{repo_id}"', text), encoding="utf-8")
    return sorted(path.name for path in staging.iterdir())


def main(argv: Sequence[str] | None = None) -> str:
    """Run the push CLI; returns the repository URL or the local folder."""
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=argv)
    if not args.repo_id and not args.local_dir:
        raise UsageError("give --repo_id to push to the Hub, or --local_dir to write the repository layout locally")
    with tempfile.TemporaryDirectory() as staging:
        files = stage_repository(args.checkpoint, staging, args.repo_id)
        if args.local_dir:
            shutil.copytree(staging, args.local_dir, dirs_exist_ok=True)
            destination = str(Path(args.local_dir).resolve())
        else:
            api = HfApi(token=args.token)
            url = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
            api.upload_folder(folder_path=staging, repo_id=args.repo_id, commit_message=args.commit_message)
            destination = str(url)
    print(f"wrote {len(files)} files ({', '.join(files)}) to {destination}", file=sys.stdout)
    return destination


if __name__ == "__main__":
    run_cli(main)
