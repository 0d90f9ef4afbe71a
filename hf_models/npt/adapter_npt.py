"""NPT adapters: save only the NP components of an [`NPTForCausalLM`] (safetensors + a JSON of the NPT fields and
a signature of the base architecture) and load them into a converted Llama. [`NPTForCausalLM`] inherits these
methods from [`NPTAdapterMixin`]."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_utils import safe_open, safe_save_file

ADAPTER_CONFIG_FILE = "npt_adapter_config.json"
ADAPTER_WEIGHTS_FILE = "npt_adapter.safetensors"
_BASE_SIGNATURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
                          "attention_bias", "mlp_bias", "tie_word_embeddings")


class NPTAdapterMixin:
    """The adapter methods of [`NPTForCausalLM`] (they use its `config`, `np_parameters` and `from_llama`)."""

    def base_signature(self) -> str:
        """sha256 of the base architecture's defining config fields (what an adapter must be loaded into)."""
        config = self.config.to_dict()
        fields = {name: config.get(name) for name in _BASE_SIGNATURE_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def save_npt_adapter(self, save_directory: str | os.PathLike, base_model: str | None = None) -> Path:
        """Save only the NP components: `npt_adapter.safetensors` + `npt_adapter_config.json` (the NPT fields, the
        base signature, the base model's name and the dtype)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.np_parameters()}
        safe_save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        fields = {key: value for key, value in self.config.to_dict().items() if key.startswith(("np_", "npt_"))}
        meta = {"npt_fields": fields, "base_signature": self.base_signature(), "dtype": str(self.dtype),
                "base_model": base_model or getattr(self.config, "_name_or_path", None)}
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_llama_and_adapter(cls, llama: LlamaForCausalLM | str | os.PathLike,
                               adapter_directory: str | os.PathLike) -> NPTAdapterMixin:
        """Convert `llama` with the adapter's NPT fields, then `load_npt_adapter`."""
        meta = json.loads((Path(adapter_directory) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        fields = {key: value for key, value in meta["npt_fields"].items() if key != "npt_enabled_layers"}
        return cls.from_llama(llama, **fields).load_npt_adapter(adapter_directory)

    @torch.no_grad()
    def load_npt_adapter(self, adapter_directory: str | os.PathLike) -> NPTAdapterMixin:
        """Load NP weights saved by `save_npt_adapter` into this model.

        Raises:
            ValueError: the adapter was made for another base architecture or other NPT layers / shapes.
        """
        folder = Path(adapter_directory)
        meta = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        if meta["base_signature"] != self.base_signature():
            raise ValueError(f"the adapter in {folder} was made for another base architecture")
        own = dict(self.np_parameters())
        with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="pt") as handle:
            names = set(handle.keys())
            if names != set(own):
                raise ValueError(f"the adapter's NP tensors do not match this model's: missing "
                                 f"{sorted(set(own) - names)[:4]}, unexpected {sorted(names - set(own))[:4]}")
            for name in names:
                tensor = handle.get_tensor(name)
                if tensor.shape != own[name].shape:
                    raise ValueError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model's is "
                                     f"{tuple(own[name].shape)}")
                own[name].copy_(tensor)
        return self


__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "NPTAdapterMixin"]
