"""SOURCE -> model + what was loaded.

load.py tells the kinds apart; pretrained.py builds timm architectures and loads `hf-hub:`
and `local-dir:` sources; files.py reads checkpoint files, arch.py works out their
architecture, keys.py reads their keys (nested dicts, prefixes, renames) and state.py
loads the tensors into the model; info.py describes a file without building a model.
"""

from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .info import read_info
from .load import load_source
from .loaded import CheckpointInfo, LoadedModel
from .pretrained import HUB_PREFIXES, LOCAL_DIR_PREFIX, create_architecture

__all__ = [
    "HUB_PREFIXES",
    "LOCAL_DIR_PREFIX",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "CheckpointInfo",
    "LoadedModel",
    "create_architecture",
    "load_source",
    "read_info",
]
