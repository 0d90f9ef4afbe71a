"""lm-evaluation-harness on the zoo: `zoo_heldout` bits per byte of every causal architecture equals the exact
figure, the masked diffusion model's Monte Carlo ELBO (against an enumerated bound), its generation's stop strings,
the local multiple-choice task, the entry point and the card section. Offline; tiny models trained here."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import lm_eval as entry
from benchmarks.lm_eval_models import MaskedDiffusionLM
from hf_models.registry import get_spec
from training import train
from training.common import UsageError, run_cli
from training.data import read_documents
from training.diffusion import nelbo_samples
from training.tokenization import token_byte_lengths

from .conftest import CAUSAL_SPECS, SPECS, spec_id

DIFFUSION = "masked_diffusion_lm"
NOT_OVERRIDDEN = ("vocab_size", "mask_token_id")  # set from the tokenizer by the training CLI


def _overrides(spec) -> str:
    fields = {key: value for key, value in spec.tiny_config.items() if key not in NOT_OVERRIDDEN}
    fields["max_position_embeddings"] = 256  # the held-out documents fit one window
    return ",".join(f"{key}={value}".replace(" ", "") for key, value in fields.items())


@pytest.fixture(scope="module")
def trained(stories_file, tmp_path_factory) -> dict[str, Path]:
    """A tiny model of every architecture, trained for 8 steps with the training CLI."""
    root = tmp_path_factory.mktemp("lm_eval_models")
    folders = {}
    for spec in sorted(SPECS, key=lambda spec: spec.base_model_required is not None):  # bases first
        folders[spec.model_type] = root / spec.model_type
        overrides = _overrides(spec)
        base = []
        if spec.base_model_required:  # NPT converts the Llama trained here; only its own fields are overridden
            base = ["--model_name_or_path", str(folders["llama"])]
            overrides = ",".join(item for item in overrides.split(",") if item.startswith(("np_", "npt_")))
        train.main([
            *base, "--model_type", spec.model_type, "--config_overrides", overrides, "--train_file", str(stories_file),
            "--max_train_documents", "200", "--vocab_size", "300", "--block_size", "64", "--max_steps", "8",
            "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--sample_max_new_tokens", "4",
            "--seed", "0", "--output_dir", str(folders[spec.model_type]),
        ])
    return folders


@pytest.fixture(scope="module")
def heldout_file(shakespeare_file, tmp_path_factory) -> Path:
    """Twelve short Tiny Shakespeare paragraphs (each fits the tiny models' 256-position context)."""
    documents = [doc for doc in read_documents(str(shakespeare_file)) if len(doc.encode()) <= 200][:12]
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def zoo_evaluate(model: str, model_args: str, tasks: list[str], heldout_file: Path | None = None, **kwargs) -> dict:
    """`simple_evaluate` on the zoo's tasks only (lm_eval's own task index takes seconds to build)."""
    manager = TaskManager(include_path=str(entry.TASKS_DIR), include_defaults=False,
                          metadata={"heldout_file": str(heldout_file)} if heldout_file else {})
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, device="cpu",
                           **kwargs)


def exact_document_bits_per_byte(folder: Path, documents: list[str]) -> float:
    """The exact bits per byte, computed here independently of lm-eval: every document scored on its own after an
    EOS, the summed next-token NLL (nats) of its tokens over ln 2 × the UTF-8 bytes they stand for."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token_bytes = token_byte_lengths(tokenizer)
    nats, num_bytes = 0.0, 0
    for document in documents:
        ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(document, add_special_tokens=False)["input_ids"]]])
        assert ids.shape[1] <= model.config.max_position_embeddings
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        nats += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        num_bytes += int(token_bytes[ids[0, 1:]].sum())
    assert num_bytes == sum(len(document.encode()) for document in documents)
    return nats / (math.log(2) * num_bytes)


@pytest.mark.parametrize("spec", CAUSAL_SPECS, ids=spec_id)
def test_zoo_heldout_bits_per_byte_is_the_exact_figure(spec, trained, heldout_file):
    results = zoo_evaluate("hf", f"pretrained={trained[spec.model_type]}", ["zoo_heldout"], heldout_file)
    figures = results["results"]["zoo_heldout"]
    exact = exact_document_bits_per_byte(trained[spec.model_type], read_documents(str(heldout_file)))
    assert figures["bits_per_byte,none"] == pytest.approx(exact, rel=1e-3)
    assert figures["byte_perplexity,none"] == pytest.approx(2 ** exact, rel=1e-3)
    assert results["n-samples"]["zoo_heldout"]["effective"] == 12


# --- the masked diffusion model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_diffusion_model():
    """A random tiny masked diffusion model with large weights, whose predictions depend strongly on which tokens
    are visible (so the bound is visibly above the model's any-order likelihood)."""
    spec = get_spec(DIFFUSION)
    torch.manual_seed(0)
    return spec.model_class(spec.make_config({"initializer_range": 0.3}, tiny=True)).eval()


def enumerated_bounds(model, context: torch.Tensor, continuation: torch.Tensor) -> tuple[float, float]:
    """Over all L! orders σ: the any-order bound B = E_σ Σ_i -log p(x_σ(i) | context, x_σ(<i)) and the exact NLL of
    the model's any-order generation, -log E_σ Π_i p(x_σ(i) | ...), both in nats."""
    mask_id, length = model.config.mask_token_id, continuation.numel()
    log_probabilities = []
    for order in itertools.permutations(range(length)):
        x = torch.cat((context, torch.full((length,), mask_id)))
        total = 0.0
        for position in order:
            with torch.no_grad():
                logits = model(input_ids=x[None]).logits[0, context.numel() + position]
            total += float(logits.double().log_softmax(-1)[continuation[position]])
            x[context.numel() + position] = continuation[position]
        log_probabilities.append(total)
    log_probabilities = torch.tensor(log_probabilities, dtype=torch.float64)
    bound = float(-log_probabilities.mean())
    nll = float(-(torch.logsumexp(log_probabilities, 0) - math.log(len(log_probabilities))))
    return bound, nll


@pytest.mark.parametrize("form, tolerance", [("count", 3.0), ("time", 4.0)])
def test_monte_carlo_bound_converges_to_the_enumerated_bound_above_the_exact_nll(
        sharp_diffusion_model, form, tolerance):
    context, continuation = torch.tensor([5, 17, 33]), torch.tensor([9, 41, 22])
    bound, nll = enumerated_bounds(sharp_diffusion_model, context, continuation)
    assert bound > nll + 0.1  # Jensen: the any-order bound is above the exact NLL, here clearly
    samples = nelbo_samples(sharp_diffusion_model, [(context, continuation)], num_samples=8192, form=form,
                            batch_size=1024, generators=[torch.Generator().manual_seed(0)])[0]
    mean, error = float(samples.mean()), float(samples.std() / math.sqrt(samples.numel()))
    assert abs(mean - bound) < tolerance * error
    assert mean > nll


def test_standard_error_shrinks_with_more_samples_and_seeds_reproduce(sharp_diffusion_model):
    rows = [(torch.tensor([5, 17, 33]), torch.tensor([9, 41, 22, 7]))]

    def estimate(num_samples: int, seed: int) -> torch.Tensor:
        return nelbo_samples(sharp_diffusion_model, rows, num_samples=num_samples,
                             generators=[torch.Generator().manual_seed(seed)])[0]

    few, many = estimate(256, 0), estimate(4096, 1)
    ratio = (few.std() / math.sqrt(256)) / (many.std() / math.sqrt(4096))
    assert 3.0 < ratio < 5.3  # 1 / sqrt(samples): 4 expected
    assert torch.equal(estimate(64, 7), estimate(64, 7))
    assert not torch.equal(estimate(64, 7), estimate(64, 8))


def test_a_rows_estimate_does_not_depend_on_its_batch(sharp_diffusion_model):
    rows = [(torch.tensor([5, 17]), torch.tensor([9, 41])), (torch.tensor([3, 4, 5, 6, 7, 8]), torch.tensor([11]))]
    alone = [nelbo_samples(sharp_diffusion_model, [row], num_samples=16, batch_size=4,
                           generators=[torch.Generator().manual_seed(i)])[0] for i, row in enumerate(rows)]
    together = nelbo_samples(sharp_diffusion_model, rows, num_samples=16, batch_size=32,
                             generators=[torch.Generator().manual_seed(i) for i in range(len(rows))])
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def diffusion_lm(trained) -> MaskedDiffusionLM:
    return MaskedDiffusionLM(pretrained=str(trained[DIFFUSION]), mc_num=16, device="cpu")


def test_loglikelihood_is_a_seeded_bound_with_its_standard_error(trained, diffusion_lm):
    requests = [Instance("loglikelihood", {}, ("Once upon a time", " there was a cat"), 0),
                Instance("loglikelihood", {}, ("", "The dog ran."), 1)]
    first = diffusion_lm.loglikelihood(requests)
    again = MaskedDiffusionLM(pretrained=str(trained[DIFFUSION]), mc_num=16, device="cpu").loglikelihood(requests)
    other_seed = MaskedDiffusionLM(pretrained=str(trained[DIFFUSION]), mc_num=16, mc_seed=5,
                                   device="cpu").loglikelihood(requests)
    assert first == again and first != other_seed
    assert all(value < 0 and isinstance(greedy, bool) for value, greedy in first)
    info = diffusion_lm.get_model_info()
    assert info["mc_num"] == 16 and info["loglikelihood_mc_standard_error_nats"]["requests"] == 2
    assert 0 < info["loglikelihood_mc_standard_error_nats"]["max"] < 10
    # a document shorter than the context is one rolling window: the bound of the text after the EOS
    (rolling,) = diffusion_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The dog ran.",), 0)])
    assert rolling == pytest.approx(first[1][0], rel=1e-6)  # the same masks; float sums of another batch


def test_rolling_windows_fit_the_context(trained):
    model = MaskedDiffusionLM(pretrained=str(trained[DIFFUSION]), mc_num=4, max_length=8, device="cpu")
    text = "Once upon a time there was a little girl who liked to play in the park with her dog."
    windows = []
    model._bounds = lambda rows: (windows.extend(rows), ([1.0] * len(rows), [0.1] * len(rows)))[1]
    (total,) = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = model.tok_encode(text)
    assert len(windows) > 2 and all(len(context) + len(continuation) <= 8 for context, continuation in windows)
    assert [token for _, continuation in windows for token in continuation] == tokens  # each token scored once
    assert total == pytest.approx(-len(windows))


def test_generate_until_stops_at_the_stop_string(diffusion_lm):
    prompt = "Once upon a time"
    ids = diffusion_lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    raw = diffusion_lm.model.diffusion_generate(ids, max_new_tokens=12, steps=12, temperature=0.0, seed=0)
    full = diffusion_lm.tokenizer.decode(raw[0, ids.shape[1]:])
    eos = diffusion_lm.tokenizer.eos_token
    full = full[:full.find(eos)] if eos in full else full
    assert len(full) >= 4
    stop = full[2:4]
    (text,) = diffusion_lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), 0)])
    assert text == full[:full.find(stop)] and stop not in text
    (unstopped,) = diffusion_lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": ["\x00never"], "max_gen_toks": 12}), 0)])
    assert unstopped == full  # without a matching stop string: cut at the EOS only


def test_masked_diffusion_runs_the_local_tasks_through_lm_eval(trained, heldout_file):
    results = zoo_evaluate("masked_diffusion", f"pretrained={trained[DIFFUSION]},mc_num=4",
                           ["zoo_heldout", "zoo_story_choice"], heldout_file)
    assert results["results"]["zoo_heldout"]["bits_per_byte,none"] > 0
    assert 0 <= results["results"]["zoo_story_choice"]["acc,none"] <= 1
    assert results["n-samples"]["zoo_story_choice"]["effective"] == 40
    config = results["config"]
    assert config["mc_num"] == 4 and "bound" in config["likelihood"]
    assert config["loglikelihood_rolling_mc_standard_error"]["requests"] == 12


# --- the entry point and the card -------------------------------------------------------------------------------

def test_entry_point_runs_lm_eval_and_the_card_command_fills_the_card(trained, heldout_file, tmp_path, capsys):
    folder = trained["llama"]
    output = folder / entry.RESULTS_FOLDER
    entry.main(["--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "zoo_heldout,zoo_story_choice",
                "--heldout_file", str(heldout_file), "--device", "cpu", "--limit", "20", "--output_path", str(output)])
    (path,) = entry.find_results(output)
    result = json.loads(path.read_text())
    assert result["n-samples"]["zoo_story_choice"]["effective"] == 20  # lm_eval's own --limit
    assert result["configs"]["zoo_heldout"]["metadata"]["heldout_file"] == str(heldout_file)
    card = (folder / "README.md").read_text()
    assert "<!-- lm_eval:start -->\n\n<!-- lm_eval:end -->" in card  # the training CLI leaves it empty
    entry.main(["card", str(folder)])
    card = (folder / "README.md").read_text()
    bpb = result["results"]["zoo_heldout"]["bits_per_byte,none"]
    assert f"| zoo_heldout | bits_per_byte | {bpb:.4g} | — |" in card
    assert f"lm_eval {result['lm_eval_version']}" in card and "`heldout.txt`" in card and "20 of 40" in card
    entry.main(["card", str(folder)])  # re-rendering replaces the section
    assert (folder / "README.md").read_text().count("## lm-evaluation-harness") == 1


@pytest.mark.parametrize("argv, expected", [
    (["--model", "masked_diffusion", "--model_args", "pretrained={diffusion},bogus=1", "--tasks", "zoo_story_choice",
      "--device", "cpu"], "masked_diffusion: unknown model argument(s) ['bogus']"),
    (["--model", "hf", "--tasks", "zoo_heldout", "--heldout_file", "missing.txt"], "--heldout_file missing.txt"),
    (["card", "{llama}", "missing.json"], "missing.json: not a readable lm-eval result file"),
], ids=["unknown-model-argument", "missing-heldout-file", "missing-results"])
def test_bad_arguments_stop_with_one_error_line(argv, expected, trained, capsys):
    argv = [arg.format(diffusion=trained[DIFFUSION], llama=trained["llama"]) for arg in argv]
    with pytest.raises(SystemExit) as stop:
        run_cli(entry.main, argv)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0]


@pytest.mark.parametrize("model_args, expected", [
    ({"pretrained": "{llama}"}, "is a llama model, not a masked diffusion model"),
    ({"pretrained": "{diffusion}", "mc_num": 1}, "mc_num must be at least 2"),
    ({"pretrained": "{diffusion}", "mc_form": "bogus"}, "mc_form must be one of"),
    ({"pretrained": "{diffusion}", "dtype": "float64x"}, "dtype must be"),
    ({}, "pass --model_args pretrained=DIR"),
])
def test_bad_model_arguments_are_usage_errors(model_args, expected, trained):
    model_args = {key: value.format(diffusion=trained[DIFFUSION], llama=trained["llama"]) if isinstance(value, str)
                  else value for key, value in model_args.items()}
    with pytest.raises(UsageError, match=re.escape(expected)):
        MaskedDiffusionLM(**model_args)


def test_help_is_lm_evals_with_the_zoos_additions(capsys):
    with pytest.raises(SystemExit) as stop:
        entry.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "masked_diffusion" in text and "--heldout_file" in text and "Language Model Evaluation Harness" in text
