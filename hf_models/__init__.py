"""hf_models: the zoo's research language models as Hugging Face models.

Importing the package imports every architecture sub-package; each registers its classes with the `Auto*`
factories and its `ArchitectureSpec` with `hf_models.registry`, and lists its public classes in `__all__`,
which are re-exported here (`hf_models.ToeplitzMixerConfig`, ...). Adding an architecture is adding a
sub-package: nothing here changes.
"""

import importlib
import pkgutil

from .registry import ArchitectureSpec, all_specs, get_spec, parse_config_overrides, register
from .tokenization_byte import ByteTokenizer

ByteTokenizer.register_for_auto_class("AutoTokenizer")  # saved byte tokenizers carry their code (remote code)

__all__ = ["ArchitectureSpec", "ByteTokenizer", "all_specs", "get_spec", "parse_config_overrides", "register"]

for _module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if _module_info.ispkg:
        _module = importlib.import_module(f"{__name__}.{_module_info.name}")
        for _name in getattr(_module, "__all__", ()):
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)
