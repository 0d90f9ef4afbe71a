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
