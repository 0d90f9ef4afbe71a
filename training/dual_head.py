"""The dual-head objective of the Bicameral byte LM: byte cross-entropy plus a teacher-token
cross-entropy, and the frequency-cutoff curriculum.

    total = char_loss_weight * CE(byte head, byte t + chunk_size) + token_loss_weight * CE(token head, token(t))

`token(t)` is the id, in a teacher BPE tokenizer, of the token that covers byte `t` of the document
(`byte_token_targets`). Alignment rules, in order:

1. The teacher tokenizes the whole document (so a token cut by a training window's edge keeps its id in both
   windows); its character offsets (`return_offsets_mapping`, fast tokenizers only) become byte offsets through the
   UTF-8 length of every character.
2. A token's bytes get its id. Consecutive tokens whose character spans overlap (a byte-level BPE splitting a
   multi-byte character, e.g. an emoji into 4 byte tokens, or " 😀" into "Ġð", "Ł", "ĺ", "Ģ" whose first span also
   covers the space) share the bytes of their spans' union in order, each taking as many bytes as its token string
   has characters when those add up to the union (exact for byte-level BPEs such as GPT-2's), else an even split.
3. Bytes no token covers (a normaliser that drops whitespace, say) get -100, the ignore index: no teacher signal.
   (The original used `ignore_index=0`, which silently dropped GPT-2's token 0, "!".)
4. The document's end-of-text byte gets the teacher's EOS id (-100 if it has none).
5. Bytes that are not valid UTF-8 (only possible for raw byte strings; the data pipeline's documents are text)
   decode one byte at a time to U+FFFD, which the teacher tokenizes like any character.

`DualHeadTrainer` computes the loss and logs `loss_char` and `loss_token` beside `loss`; `CutoffCurriculum` raises
the model's frequency cutoff when the byte loss plateaus. `DualHeadTrainer.from_cli` is what
`python -m training.train --model_type bicameral_lm` runs; objective arguments (`--objective_args`):

* `teacher_tokenizer=PATH`: a `PreTrainedTokenizerFast` folder (or Hub id) as teacher; default: a byte-level BPE of
  `teacher_vocab_size` tokens fitted on the training documents (offline).
* `teacher_vocab_size=N`: default the model's `token_vocab_size`.
* `char_loss_weight=W`, `token_loss_weight=W`: override the config's weights (0 = the single-head model).
* `char_supervision=all|last_chunk`: next-(chunk) byte at every position (default), or, as the original, only the
  last `chunk_size` targets of each window.
* `curriculum=true|false` (default: on when the config has a `cutoff`), `cutoff_schedule=[128,512]` (the stages
  after the config's cutoff; all bins after the last), `plateau_window=10`, `plateau_patience=50`,
  `plateau_threshold=0.01`, `lr_on_raise=halve|keep`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from datasets import Dataset
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_models.configuration_zoo_common import check_positive

from .data import tokenize_and_pack
from .options import ObjectiveOptions
from .tokenization import MIN_BPE_VOCAB, load_tokenizer, train_bpe_tokenizer
from .trainer import CLIInputs, ZooTrainer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_EOS_MARKER = -1  # stands for the end-of-text target while packing (real ids are >= 0, "no target" is -100)
TEACHER_FOLDER = "teacher_tokenizer"


# ----------------------------------------------------------------------------------------------------------------
# Byte -> teacher-token alignment


def decode_utf8_with_offsets(data: bytes) -> tuple[str, list[int]]:
    """Decode `data` as UTF-8 and return the text and the byte offset of each character, plus `len(data)`.

    Every byte that does not start a valid UTF-8 sequence decodes on its own to U+FFFD, so `offsets` always maps
    characters back to the bytes they came from.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        chars, offsets, position = [], [], 0
        while position < len(data):
            lead = data[position]
            size = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else \
                4 if 0xF0 <= lead < 0xF5 else 0
            try:
                char = data[position:position + size].decode("utf-8") if size else None
            except UnicodeDecodeError:
                char = None
            if char is None or len(char) != 1:
                char, size = "\ufffd", 1
            chars.append(char)
            offsets.append(position)
            position += size
        return "".join(chars), offsets + [len(data)]
    lengths = np.fromiter((len(char.encode("utf-8")) for char in text), dtype=np.int64, count=len(text))
    return text, [0] + np.cumsum(lengths).tolist()


def check_teacher(teacher: PreTrainedTokenizerBase) -> None:
    """Raise a `ValueError` unless `teacher` can report character offsets (a fast tokenizer)."""
    if not getattr(teacher, "is_fast", False):
        raise ValueError(f"the teacher tokenizer ({type(teacher).__name__}) is not a fast tokenizer: its offsets "
                         "(return_offsets_mapping) are unavailable, so bytes cannot be aligned to its tokens; pass a "
                         "PreTrainedTokenizerFast (tokenizer.json)")


def _fill_targets(targets: list[int], ids: Sequence[int], tokens: Sequence[str],
                  spans: Sequence[tuple[int, int]], byte_offsets: Sequence[int]) -> None:
    index = 0
    while index < len(ids):
        # a group: consecutive tokens whose character spans overlap (a byte-level BPE splitting a multi-byte
        # character: "é" as two tokens with the same span, or " 😀" as "Ġð" (0, 2), "Ł" (1, 2), ...)
        end, stop_char = index + 1, spans[index][1]
        while end < len(ids) and spans[end][0] < stop_char:
            stop_char = max(stop_char, spans[end][1])
            end += 1
        start_byte, stop_byte = byte_offsets[spans[index][0]], byte_offsets[stop_char]
        group = range(index, end)
        width = stop_byte - start_byte
        if width > 0:
            sizes = [len(tokens[i]) for i in group]
            if sum(sizes) != width:
                sizes = [width // len(group) + (k < width % len(group)) for k in range(len(group))]
            position = start_byte
            for i, size in zip(group, sizes):
                for byte in range(position, min(position + size, stop_byte)):
                    if targets[byte] == IGNORE_INDEX:
                        targets[byte] = ids[i]
                position += size
        index = end


def byte_token_targets(data: bytes | str, teacher: PreTrainedTokenizerBase) -> list[int]:
    """The teacher-token id covering each byte of `data` (UTF-8 bytes, or text encoded as UTF-8), -100 where no
    token covers it. See the module docstring for the rules."""
    return batch_byte_token_targets([data], teacher)[0]


def batch_byte_token_targets(documents: Sequence[bytes | str], teacher: PreTrainedTokenizerBase) -> list[list[int]]:
    """`byte_token_targets` for many documents, tokenized in one batch."""
    check_teacher(teacher)
    raw = [doc.encode("utf-8") if isinstance(doc, str) else bytes(doc) for doc in documents]
    decoded = [decode_utf8_with_offsets(data) for data in raw]
    encoded = teacher([text for text, _ in decoded], add_special_tokens=False, return_offsets_mapping=True)
    result = []
    for data, (_, byte_offsets), ids, spans in zip(raw, decoded, encoded["input_ids"], encoded["offset_mapping"]):
        targets = [IGNORE_INDEX] * len(data)
        _fill_targets(targets, ids, teacher.convert_ids_to_tokens(ids), spans, byte_offsets)
        result.append(targets)
    return result


class _TargetTokenizer:
    """Looks like a tokenizer to `tokenize_and_pack`, but yields each byte's teacher-token target: packing it with
    the same documents and block size gives rows aligned position by position with the byte rows."""

    def __init__(self, teacher: PreTrainedTokenizerBase) -> None:
        self.teacher = teacher
        self.eos_token_id = _EOS_MARKER

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": batch_byte_token_targets(texts, self.teacher)}


def add_token_labels(
    blocks: Dataset, documents: Dataset, teacher: PreTrainedTokenizerBase, byte_tokenizer: PreTrainedTokenizerBase
) -> Dataset:
    """Add a `token_labels` column to packed byte `blocks` made by `tokenize_and_pack(documents, byte_tokenizer,
    block_size)`, by packing the teacher targets of the same documents the same way.

    Raises:
        ValueError: the blocks were not packed from these documents (end-of-text positions differ).
    """
    block_size = len(blocks[0]["input_ids"])
    packed = tokenize_and_pack(documents, _TargetTokenizer(teacher), block_size, split_name="teacher targets").blocks
    targets = np.asarray(packed["input_ids"], dtype=np.int64)
    byte_ids = np.asarray(blocks["input_ids"], dtype=np.int64)
    if targets.shape != byte_ids.shape or not np.array_equal(targets == _EOS_MARKER,
                                                               byte_ids == byte_tokenizer.eos_token_id):
        raise ValueError("the training blocks were not packed from the training documents with the byte tokenizer "
                         "(tokenize_and_pack), so teacher-token targets cannot be aligned; add a 'token_labels' "
                         "column yourself")
    targets[targets == _EOS_MARKER] = IGNORE_INDEX if teacher.eos_token_id is None else teacher.eos_token_id
    return blocks.add_column("token_labels", targets.tolist())


def fit_teacher_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE teacher of `vocab_size` tokens fitted on `texts` (the offline stand-in for GPT-2's).

    Raises:
        ValueError: `vocab_size` is below the BPE minimum (256 bytes + special tokens).
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"a byte-level BPE teacher needs at least {MIN_BPE_VOCAB} tokens, but the model's "
                         f"token_vocab_size / teacher_vocab_size is {vocab_size}; raise it or pass "
                         "teacher_tokenizer=PATH")
    return train_bpe_tokenizer(texts, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# The cutoff curriculum


class CutoffCurriculum(TrainerCallback):
    """Raise the model's frequency cutoff when the byte loss plateaus (the original's `plateau_cutoff`).

    At every training log it reads the byte loss (`loss_char`, else `loss`), keeps the mean over the last `window`
    optimizer steps, and counts the optimizer steps since that mean last fell below `best - threshold`. After
    `patience` such steps the cutoff moves to the next stage of `stages` (`None` = all bins), the best loss resets
    (to infinity, as in the original) and, with `lr_on_raise="halve"` (the original dual-head script), the learning
    rate is halved from then on. With `logging_steps=1` this is exactly the original's per-step rule; otherwise each
    log counts for the `logging_steps` it averages. Every raise is logged and kept in `changes` and in the
    trainer's `log_history` (`cutoff_from`, `cutoff_to`), from which a run resumed from a checkpoint replays them.

    Args:
        stages: cutoffs to move through, in order, after the model's current one (`None` = all bins).
        window / patience: optimizer steps of the running mean and of the plateau.
        threshold: the least improvement of the running mean that counts.
        lr_on_raise: `"halve"` or `"keep"` the learning rate at a raise.
    """

    def __init__(self, stages: Sequence[int | None], *, window: int = 10, patience: int = 50,
                 threshold: float = 0.01, lr_on_raise: str = "halve") -> None:
        if lr_on_raise not in ("halve", "keep"):
            raise ValueError(f"lr_on_raise must be 'halve' or 'keep', got {lr_on_raise!r}")
        if window < 1 or patience < 1 or threshold < 0:
            raise ValueError("plateau_window and plateau_patience must be >= 1 and plateau_threshold >= 0")
        self.stages = list(stages)
        self.window, self.patience, self.threshold, self.lr_on_raise = window, patience, threshold, lr_on_raise
        self.best = math.inf
        self.stalled = 0
        self._recent: list[tuple[int, float]] = []  # (optimizer steps the log covers, mean loss)
        self._last_step = 0
        self.changes: list[dict[str, Any]] = []

    def observe(self, steps: int, loss: float) -> bool:
        """Feed a loss averaged over `steps` optimizer steps; return whether the plateau rule fires."""
        self._recent.append((steps, loss))
        while sum(n for n, _ in self._recent[1:]) >= self.window:
            self._recent.pop(0)
        if sum(n for n, _ in self._recent) < self.window or not self.stages:
            return False
        mean = sum(n * value for n, value in self._recent) / sum(n for n, _ in self._recent)
        if mean < self.best - self.threshold:
            self.best, self.stalled = mean, 0
            return False
        self.stalled += steps
        return self.stalled >= self.patience

    def raise_cutoff(self, model: PreTrainedModel, step: int, lr_scheduler=None, optimizer=None) -> dict[str, Any]:
        """Move `model` to the next stage, reset the plateau state and apply `lr_on_raise`; return the event."""
        old, new = model.config.cutoff, self.stages.pop(0)
        model.set_cutoff(new)
        if self.lr_on_raise == "halve":
            scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
            for group in (optimizer.param_groups if optimizer is not None else []):
                group["lr"] /= 2
        self.best, self.stalled, self._recent = math.inf, 0, []
        event = {"step": step, "cutoff_from": old, "cutoff_to": new, "lr_on_raise": self.lr_on_raise}
        self.changes.append(event)
        logger.info("curriculum: cutoff %s -> %s at step %d (learning rate: %s)", old, new, step, self.lr_on_raise)
        return event

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: PreTrainedModel | None = None, **kwargs) -> None:
        # Resuming from a checkpoint: replay the raises recorded in the restored log history (the scheduler's
        # halved rates come back with its own state).
        self._last_step = state.global_step
        for event in (entry for entry in state.log_history if "cutoff_to" in entry):
            if model is not None and self.stages and self.stages[0] == event["cutoff_to"]:
                model.set_cutoff(self.stages.pop(0))
                self.changes.append({key: event[key] for key in ("step", "cutoff_from", "cutoff_to", "lr_on_raise")})

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, model: PreTrainedModel | None = None, **kwargs) -> None:
        logs = logs or {}
        loss = logs.get("loss_char", logs.get("loss"))
        if loss is None or model is None:
            return
        steps, self._last_step = state.global_step - self._last_step, state.global_step
        if steps > 0 and self.observe(steps, float(loss)):
            event = self.raise_cutoff(model, state.global_step, kwargs.get("lr_scheduler"), kwargs.get("optimizer"))
            state.log_history.append(dict(event))


def curriculum_stages(current: int | None, schedule: Sequence[int]) -> list[int | None]:
    """The stages after `current`: the scheduled cutoffs above it, then `None` (all bins); none if `current` is
    already `None`."""
    if current is None:
        return []
    return [cutoff for cutoff in sorted(schedule) if cutoff > current] + [None]


# ----------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class DualHeadOptions(ObjectiveOptions):
    """The `--objective_args` of `DualHeadTrainer.from_cli` (see the module docstring)."""

    objective_name: ClassVar[str] = "the dual-head objective"

    teacher_tokenizer: str | None = None
    teacher_vocab_size: int | None = None
    char_loss_weight: float | None = None
    token_loss_weight: float | None = None
    char_supervision: Literal["all", "last_chunk"] = "all"
    curriculum: bool | None = None
    cutoff_schedule: list[int] = field(default_factory=lambda: [128, 512])
    plateau_window: int = 10
    plateau_patience: int = 50
    plateau_threshold: float = 0.01
    lr_on_raise: Literal["halve", "keep"] = "halve"

    def validate(self) -> None:
        for name in ("char_loss_weight", "token_loss_weight"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name), allow_zero=True, integer=False)
        if not all(cutoff > 0 for cutoff in self.cutoff_schedule):
            raise ValueError(f"`cutoff_schedule` must be a list of positive bin counts, e.g. [128,512], got "
                             f"{self.cutoff_schedule!r}")


class DualHeadTrainer(ZooTrainer):
    """`Trainer` for the dual-head objective (see the module docstring).

    Training batches may carry `token_labels` (teacher-token ids per byte, -100 ignored); without them, or with
    `token_loss_weight=0`, the token head is not computed and the loss is the single-head byte loss. Evaluation
    reports the byte cross-entropy only (`eval_loss`, nats per byte), so it compares across token weights.

    Args:
        char_supervision: `"all"` (every position) or `"last_chunk"` (only the last `chunk_size` targets of a
            window, the original's chunk objective).
        curriculum: the `CutoffCurriculum` callback, if any (also passed in `callbacks`).
        Other arguments: those of `Trainer`.
    """

    options_class = DualHeadOptions

    def __init__(self, *args: Any, char_supervision: str = "all", curriculum: CutoffCurriculum | None = None,
                 **kwargs: Any) -> None:
        if curriculum is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), curriculum]
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            # `token_labels` is a forward argument, so the Trainer would otherwise require it in every evaluation
            # batch before computing a loss; evaluation needs only the byte labels.
            self.label_names = ["labels"]
        self.char_supervision = char_supervision
        self.curriculum = curriculum

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.accelerator.unwrap_model(model).config
        inputs = dict(inputs)
        token_labels = inputs.pop("token_labels", None)
        use_token = (model.training and token_labels is not None and config.token_loss_weight > 0
                     and config.token_vocab_size > 0)
        if self.char_supervision == "last_chunk" and inputs.get("labels") is not None:
            labels = inputs["labels"].clone()
            labels[:, :-config.chunk_size] = IGNORE_INDEX
            inputs["labels"] = labels
        outputs = model(**inputs, token_labels=token_labels if use_token else None)
        char_loss = outputs.loss
        if not model.training:
            return (char_loss, outputs) if return_outputs else char_loss
        loss = config.char_loss_weight * char_loss
        components = {"char": char_loss}
        if use_token:
            loss = loss + config.token_loss_weight * outputs.token_loss
            components["token"] = outputs.token_loss
        self.record_loss_components(**components)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            config = self.accelerator.unwrap_model(self.model).config
            logs["cutoff"] = config.cutoff if config.cutoff is not None else config.num_freq_bins
        super().log(logs, start_time)

    @classmethod
    def objective_kwargs(cls, options: DualHeadOptions, inputs: CLIInputs) -> dict[str, Any]:
        """`from_cli`'s hook: teacher (loaded or fitted on the training texts), token targets aligned with the packed
        byte blocks, curriculum. The fitted teacher is saved to `<output_dir>/teacher_tokenizer`."""
        config, train_dataset = inputs.model.config, inputs.train_dataset
        for name in ("char_loss_weight", "token_loss_weight"):
            if getattr(options, name) is not None:
                setattr(config, name, float(getattr(options, name)))
        wants_tokens = config.token_vocab_size > 0 and config.token_loss_weight > 0
        if wants_tokens and "token_labels" not in train_dataset.column_names:
            teacher = prepare_teacher(options, config.token_vocab_size, inputs.train_texts["text"])
            if inputs.args.process_index == 0:
                teacher.save_pretrained(str(Path(inputs.args.output_dir) / TEACHER_FOLDER))
            train_dataset = add_token_labels(train_dataset, inputs.train_texts, teacher, inputs.tokenizer)
        use_curriculum = options.curriculum if options.curriculum is not None else config.cutoff is not None
        curriculum = None
        if use_curriculum:
            if config.cutoff is None:
                raise ValueError("curriculum=true needs an initial cutoff in the config (e.g. cutoff=128)")
            curriculum = CutoffCurriculum(
                curriculum_stages(config.cutoff, [c for c in options.cutoff_schedule if c < config.num_freq_bins]),
                window=options.plateau_window, patience=options.plateau_patience,
                threshold=options.plateau_threshold, lr_on_raise=options.lr_on_raise)
        return {"train_dataset": train_dataset, "char_supervision": options.char_supervision,
                "curriculum": curriculum}


def prepare_teacher(options: DualHeadOptions, token_vocab_size: int, texts: Sequence[str]) -> PreTrainedTokenizerBase:
    """The teacher tokenizer: `options.teacher_tokenizer` loaded, or a BPE fitted on `texts`.

    Raises:
        ValueError: the teacher is not fast, or its vocabulary does not fit the model's token head.
    """
    if options.teacher_tokenizer:
        teacher = load_tokenizer(options.teacher_tokenizer)
    else:
        teacher = fit_teacher_tokenizer(texts, options.teacher_vocab_size or token_vocab_size)
    check_teacher(teacher)
    if len(teacher) > token_vocab_size:
        raise ValueError(f"the teacher tokenizer has {len(teacher)} tokens but the model's token head has "
                         f"token_vocab_size={token_vocab_size}; set token_vocab_size >= {len(teacher)}")
    return teacher
