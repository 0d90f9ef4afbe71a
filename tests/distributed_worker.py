"""Worker of `test_distributed.py`: runs the training CLI in one process of a `torchrun` / `accelerate launch`
job, then writes this rank's final weights and logged losses to `<output_dir>/rank<r>.safetensors|.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from training import train

if __name__ == "__main__":
    trainer = train.main(sys.argv[1:])
    rank = dist.get_rank() if dist.is_initialized() else 0
    output_dir = Path(trainer.args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # under FSDP the parameters are DTensor shards: gather each (a collective, so every rank runs it)
    state = {name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().contiguous()
             for name, tensor in trainer.model.state_dict().items()}
    save_file(state, output_dir / f"rank{rank}.safetensors")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (output_dir / f"rank{rank}.json").write_text(json.dumps({
        "losses": losses, "world_size": trainer.args.world_size,
        "total_train_batch_size": trainer.args.train_batch_size * trainer.args.world_size,
        "backend": dist.get_backend() if dist.is_initialized() else None, "fsdp": trainer.is_fsdp_enabled,
        "sharded": any(hasattr(tensor, "full_tensor") for tensor in trainer.model.state_dict().values()),
    }))
