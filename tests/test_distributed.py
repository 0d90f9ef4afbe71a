"""The training CLI under `torchrun` and `accelerate launch`: two CPU processes (gloo) train in data parallel and end
identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2"


TORCHRUN = (shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run").split()
LAUNCHERS = {
    "torchrun": lambda port: [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port)],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
                                "--num_processes", "2", "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher,port", [("torchrun", 29517), ("accelerate", 29518)])
def test_two_gloo_processes_end_with_identical_weights_and_a_falling_loss(stories_file, tmp_path, launcher, port):
    """The README's commands, without `--use_cpu`: the two ranks form one data-parallel job (global batch 2 x 4)."""
    command = [*LAUNCHERS[launcher](port), *_worker_arguments(stories_file, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_one_data_parallel_job(tmp_path / "out")


def test_two_nodes_on_localhost_meet_through_the_c10d_rendezvous(stories_file, tmp_path):
    """The README's multi-node torchrun command as two one-process "nodes" on 127.0.0.1."""
    node = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "127.0.0.1:29519", "--rdzv_id", "zoo-test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*node, *_worker_arguments(stories_file, tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in nodes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]
    _check_one_data_parallel_job(tmp_path / "out")


def _worker_arguments(stories_file, tmp_path) -> list[str]:
    return [
        str(ROOT / "tests" / "distributed_worker.py"),
        "--model_type", "llama", "--config_overrides", TINY, "--train_file", str(stories_file),
        "--max_train_documents", "400", "--vocab_size", "300", "--block_size", "64",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "12", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--sample_max_new_tokens", "4",
    ]


def _check_one_data_parallel_job(out) -> None:
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(info["world_size"] == 2 and info["backend"] == "gloo" for info in ranks)
    assert all(info["total_train_batch_size"] == 8 for info in ranks)
    weights = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    losses = ranks[0]["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.95 * sum(losses[:3])
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()  # rank 0 saved the folder


FSDP_PORTS = {"bicameral_lm": 29521, "llama": 29523, "nanohead_gpt": 29525, "toeplitz_mixer": 29529}


def _tiny_overrides(model_type: str) -> str:
    from hf_models.registry import get_spec

    spec = get_spec(model_type)
    fields = {key: value for key, value in spec.tiny_config.items() if key != "vocab_size"}
    defaults = spec.config_class(**spec.tiny_config).to_dict()  # CLI defaults the tiny config leaves: the class's
    fields.update({key: defaults[key] for key in spec.default_config if key not in fields and key in defaults})
    return ",".join(f"{key}={value}".replace(" ", "") for key, value in fields.items())


@pytest.fixture(scope="module")
def llama_base(stories_file, tmp_path_factory) -> Path:
    """A tiny Llama trained by the CLI, the base NPT converts."""
    from training import train

    folder = tmp_path_factory.mktemp("fsdp") / "llama"
    train.main(["--model_type", "llama", "--config_overrides", _tiny_overrides("llama"), "--train_file",
                str(stories_file), "--max_train_documents", "200", "--vocab_size", "300", "--block_size", "32",
                "--output_dir", str(folder), "--max_steps", "4", "--save_strategy", "no", "--report_to", "none",
                "--use_cpu", "--disable_tqdm", "true", "--sample_max_new_tokens", "2"])
    return folder


def _run_two_ranks(out: Path, port: int, model_type: str, stories_file, llama_base, *extra: str,
                   check: bool = True, entry: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if model_type == "npt_llama":
        overrides = ",".join(item for item in _tiny_overrides(model_type).split(",") if item.startswith(("np_", "npt_")))
        base = ["--model_name_or_path", str(llama_base)]
    else:
        overrides, base = _tiny_overrides(model_type), []
    entry = entry or (str(ROOT / "tests" / "distributed_worker.py"),)
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), *entry,
               *base, "--model_type", model_type, "--config_overrides", overrides, "--train_file", str(stories_file),
               "--max_train_documents", "200", "--vocab_size", "300", "--block_size", "32", "--output_dir", str(out),
               "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
               "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
               "--sample_max_new_tokens", "4", "--seed", "0", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def test_npt_under_fsdp_stops_with_one_line(stories_file, llama_base, tmp_path):
    """NPT's objective reads its generators' weights outside the forward pass, which FSDP keeps sharded."""
    result = _run_two_ranks(tmp_path / "npt", 29527, "npt_llama", stories_file, llama_base, "--fsdp",
                            "full_shard auto_wrap", check=False, entry=("-m", "training.train"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "train NPT with data parallelism" in errors[0], result.stderr[-2000:]
    assert "NPT objective reads" not in result.stderr.replace(errors[0], ""), "one line per rank, no traceback"


@pytest.mark.parametrize("model_type", sorted(FSDP_PORTS))
def test_fsdp_on_two_cpu_ranks_shards_saves_and_matches_ddp(model_type, stories_file, llama_base, tmp_path):
    """The README's FSDP command (`--fsdp "full_shard auto_wrap"`, FSDP2 wrapping each `_no_split_modules` layer) on
    2 gloo ranks: the parameters are sharded, the saved folder loads and equals the gathered model, and the losses
    equal those of a DDP run of the same seed and data."""
    from transformers import AutoModelForCausalLM

    port = FSDP_PORTS[model_type]
    _run_two_ranks(tmp_path / "fsdp", port, model_type, stories_file, llama_base, "--fsdp", "full_shard auto_wrap")
    _run_two_ranks(tmp_path / "ddp", port + 1, model_type, stories_file, llama_base)
    fsdp = [json.loads((tmp_path / "fsdp" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    ddp = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    assert all(info["fsdp"] and info["sharded"] and info["world_size"] == 2 for info in fsdp)
    assert not ddp["fsdp"] and not ddp["sharded"]
    assert len(fsdp[0]["losses"]) == 4
    torch.testing.assert_close(torch.tensor(fsdp[0]["losses"]), torch.tensor(ddp["losses"]), rtol=1e-4, atol=1e-5)
    gathered = load_file(tmp_path / "fsdp" / "rank0.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp", trust_remote_code=True).state_dict()
    assert set(saved) <= set(gathered)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, gathered[name], msg=name)
    ddp_weights = load_file(tmp_path / "ddp" / "rank0.safetensors")
    for name, tensor in gathered.items():
        torch.testing.assert_close(tensor, ddp_weights[name], rtol=1e-4, atol=1e-5, msg=name)
