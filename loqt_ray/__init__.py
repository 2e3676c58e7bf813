"""loqt-ray: LoQT pretraining of LLaMA models on Ray Train, DeepSpeed ZeRO and Ray Tune."""
from .config import Config, LoQTConfig, load_config
from .loqt import LoQTLinear, apply_loqt
from .schedule import update_steps

__all__ = ["Config", "LoQTConfig", "LoQTLinear", "apply_loqt", "load_config", "update_steps"]
__version__ = "0.1.0"
