"""loqt-ray: LoQT pretraining of LLaMA models on Ray Train, DeepSpeed ZeRO and Ray Tune.

The names below load on first use, so importing the package (and the CLI) stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "Config": "config",
    "LoQTConfig": "config",
    "load_config": "config",
    "LoQTLinear": "loqt",
    "apply_loqt": "loqt",
    "update_steps": "schedule",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loqt_ray' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
