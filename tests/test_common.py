"""The common test battery: every registered architecture gets these tests by registering (tiny configs,
fixed seeds, CPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, TrainingArguments

import hf_models
from hf_models.configuration_zoo_common import check_bool
from hf_models.registry import ArchitectureSpec
from training.data import DataArguments, load_documents, tokenize_and_pack
from training.tokenization import train_bpe_tokenizer
from training.train import config_for_tokenizer
from training.trainer import resolve_trainer

from .conftest import CACHED_SPECS, CAUSAL_SPECS, SPECS, assert_same_generation, left_padded, spec_id, tiny_model

AUTO_FOR_TASK = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM}


def random_ids(spec: ArchitectureSpec, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    config = spec.make_config(tiny=True)
    specials = {getattr(config, name, None) for name in ("pad_token_id", "eos_token_id", "mask_token_id")}
    low = max([i for i in specials if i is not None] + [-1]) + 1
    low = low if low < config.vocab_size // 2 else 0
    return torch.randint(low, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_config_round_trip(spec: ArchitectureSpec, tmp_path):
    config = spec.make_config(tiny=True)
    again = spec.config_class.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is spec.config_class
    assert loaded.to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize(
    "spec,overrides,field",
    [(spec, overrides, field) for spec in SPECS for overrides, field in spec.invalid_configs],
    ids=lambda value: value.model_type if isinstance(value, ArchitectureSpec) else None,
)
def test_config_rejects_invalid_values(spec: ArchitectureSpec, overrides, field):
    with pytest.raises(ValueError) as error:
        spec.make_config(overrides, tiny=True)
    assert re.search(field.replace("_", "[ _]"), str(error.value)), str(error.value)


@pytest.mark.parametrize("value", [1, 0, 0.0, 1.0, "true", None])
def test_config_bool_check_refuses_non_bools(value):
    # check_choice(name, value, (True, False)) let 1 and 0.0 through (1 == True); check_bool does not
    check_bool("add_sampler_head", True)
    check_bool("add_sampler_head", False)
    with pytest.raises(ValueError, match="`add_sampler_head` must be a bool"):
        check_bool("add_sampler_head", value)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_unknown_config_field_is_rejected(spec: ArchitectureSpec):
    with pytest.raises(ValueError, match="unknown config field"):
        spec.make_config({"no_such_field": 1}, tiny=True)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_save_load_gives_identical_logits_through_auto_classes(spec: ArchitectureSpec, tmp_path):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 12)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")), "weights must be saved as safetensors only"
    loaded = AUTO_FOR_TASK[spec.task].from_pretrained(tmp_path).eval()
    assert type(loaded) is spec.model_class
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_auto_classes_build_the_registered_classes(spec: ArchitectureSpec):
    config = spec.make_config(tiny=True)
    assert type(AutoConfig.for_model(spec.model_type)) is spec.config_class
    assert type(AUTO_FOR_TASK[spec.task].from_config(config)) is spec.model_class
    if spec.base_model_class is not None:
        assert type(AutoModel.from_config(config)) is spec.base_model_class


@pytest.mark.parametrize("spec", CAUSAL_SPECS, ids=spec_id)
def test_loss_is_the_shifted_cross_entropy(spec: ArchitectureSpec):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 2, 10)
    labels = input_ids.clone()
    labels[0, 3] = -100
    with torch.no_grad():
        output = model(input_ids, labels=labels)
    logits = output.logits[:, :-1].reshape(-1, output.logits.shape[-1]).float()
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert model(input_ids).loss is None


def _greedy(model, input_ids, attention_mask=None, use_cache=True, new_tokens=8):
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
        eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=spec_id)
def test_cached_generation_equals_uncached(spec: ArchitectureSpec):
    model = tiny_model(spec)
    input_ids = random_ids(spec, 3, 6)
    cached = _greedy(model, input_ids, use_cache=True)
    uncached = _greedy(model, input_ids, use_cache=False)
    assert_same_generation(cached, uncached)


@pytest.mark.parametrize("spec", CAUSAL_SPECS, ids=spec_id)
def test_left_padded_batch_equals_each_row_alone(spec: ArchitectureSpec):
    model = tiny_model(spec)
    rows = [random_ids(spec, 1, 7, seed=2)[0], random_ids(spec, 1, 4, seed=3)[0]]
    input_ids, attention_mask = left_padded(rows)
    width = input_ids.shape[1]
    batched = _greedy(model, input_ids, attention_mask, use_cache=spec.supports_cache)
    for i, row in enumerate(rows):
        alone = _greedy(model, row[None], use_cache=spec.supports_cache)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):])
        for step_batched, step_alone in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_batched[i], step_alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gradient_reaches_every_trainable_parameter(spec: ArchitectureSpec):
    model = tiny_model(spec).train()
    input_ids = random_ids(spec, 2, 12)
    model(input_ids, labels=input_ids).loss.backward()
    missing = [
        name for name, parameter in model.named_parameters()
        if parameter.requires_grad and not name.startswith(spec.auxiliary_parameters)
        and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient reaches {missing}"


@pytest.fixture(scope="module")
def corpus_blocks(shakespeare_file):
    """Packed blocks of real text for the short training runs (BPE of 512 tokens, blocks of 64)."""
    documents = load_documents(DataArguments(train_file=str(shakespeare_file), max_train_documents=1500))
    bpe = train_bpe_tokenizer(documents["train"]["text"], vocab_size=512)
    return bpe, documents, {
        name: tokenize_and_pack(documents[name], bpe, 64, split_name=name).blocks for name in ("train", "validation")
    }


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_short_trainer_run_lowers_the_loss(spec: ArchitectureSpec, corpus_blocks, tmp_path):
    bpe, documents, blocks = corpus_blocks
    tokenizer = hf_models.ByteTokenizer() if spec.tokenizer == "byte" else bpe
    if spec.tokenizer == "byte":
        blocks = {name: tokenize_and_pack(documents[name], tokenizer, 64, split_name=name).blocks
                  for name in ("train", "validation")}
    torch.manual_seed(0)
    model = spec.model_class(config_for_tokenizer(spec, tokenizer, {"max_position_embeddings": 64}, tiny=True))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_pin_memory=False, disable_tqdm=True,
    )
    trainer = resolve_trainer(spec).from_cli(
        model=model, args=args, tokenizer=tokenizer, train_dataset=blocks["train"],
        eval_dataset=blocks["validation"], objective_args={}, train_texts=documents["train"],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, f"loss did not fall by 5%: first five {first:.3f}, last five {last:.3f}"


@pytest.mark.parametrize("spec", [s for s in CAUSAL_SPECS if s.lora_target_modules], ids=spec_id)
def test_lora_adapters_train_and_leave_the_base_untouched(spec: ArchitectureSpec):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(spec)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.lora_target_modules), task_type="CAUSAL_LM")
    )
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = random_ids(spec, 4, 16)
    losses = []
    for _ in range(15):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    merged = peft_model.unload().state_dict()
    assert all(torch.equal(merged[name], tensor) for name, tensor in base.items())


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_saved_folder_loads_as_remote_code_without_hf_models(spec: ArchitectureSpec, tmp_path):
    """The head class and `AutoModel` (every Auto class the architecture registers) load the saved folder."""
    model = tiny_model(spec)
    model.save_pretrained(tmp_path / "model")
    if spec.model_class.__module__.startswith("hf_models"):  # remote code (the Llama baseline is in transformers)
        auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
        assert {"AutoConfig", "AutoModel", AUTO_FOR_TASK[spec.task].__name__} <= auto_map.keys()
    input_ids = random_ids(spec, 1, 8)
    with torch.no_grad():
        expected = model(input_ids).logits[0, -1].tolist()
        expected_hidden = model.base_model(input_ids)[0][0, -1].tolist()
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["hf_models"] = None  # the zoo's package must not be needed
        import torch
        from transformers import AutoModel, {AUTO_FOR_TASK[spec.task].__name__} as Auto
        folder = {str(tmp_path / "model")!r}
        model = Auto.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        for loaded in (model, base):
            assert not type(loaded).__module__.startswith("hf_models"), type(loaded).__module__
        assert type(base).__name__ == {type(model.base_model).__name__!r}, type(base).__name__
        with torch.no_grad():
            ids = torch.tensor({input_ids.tolist()})
            print(json.dumps([model(ids).logits[0, -1].tolist(), base(ids)[0][0, -1].tolist()]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logits, hidden = json.loads(result.stdout.strip().splitlines()[-1])
    # CPU BLAS may round a product differently in another process (buffer alignment): a few float32 ulps
    torch.testing.assert_close(torch.tensor(logits), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(hidden), torch.tensor(expected_hidden), rtol=1e-6, atol=1e-6)
