"""BEM: context-routed low-rank modules on frozen Hugging Face causal LMs."""
from bem.module.attach import attach_bem, bem_disabled, bem_layers, bem_state_dict, load_bem, save_bem, set_bem_enabled
from bem.module.config import BEMConfig, BEMConfigError
from bem.export import export_peft
from bem.module.layer import BEMLayer

__version__ = "0.1.0"
__all__ = ["BEMConfig", "BEMConfigError", "BEMLayer", "attach_bem", "bem_disabled", "bem_layers",
           "bem_state_dict", "export_peft", "load_bem", "save_bem", "set_bem_enabled"]
