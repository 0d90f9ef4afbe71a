"""hf_models: the zoo's research language models as Hugging Face models.

Importing the package imports every architecture sub-package listed below; each registers its `ArchitectureSpec`
(`hf_models.registry.register`, which also registers its classes with the `Auto*` factories) and lists its public
classes in `__all__`, which are re-exported here (`hf_models.ToeplitzMixerConfig`, ...). Adding an architecture is
adding a sub-package and its line here.
"""

from .registry import ArchitectureSpec, all_specs, get_spec, parse_config_overrides, register
from .tokenization_byte import ByteTokenizer

ByteTokenizer.register_for_auto_class("AutoTokenizer")  # saved byte tokenizers carry their code (remote code)

__all__ = ["ArchitectureSpec", "ByteTokenizer", "all_specs", "get_spec", "parse_config_overrides", "register"]

from . import bicameral, llama, masked_diffusion, nanohead, npt, toeplitz_mixer  # noqa: E402  (after the registry)

for _module in (bicameral, llama, masked_diffusion, nanohead, npt, toeplitz_mixer):
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
