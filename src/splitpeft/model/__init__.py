"""Models and adapters: loading a model (the embedded SmolLM2, tiny test models, a folder or a hub id)
or only a party's part of it, the backbone view every family shares, LoRA adapters via peft, the
completion loss, runtime devices and dtypes, one batched pass for many sessions, and a device's FLOP
and memory meter.

Public API (each name imported from its module on first use):

- `loading`: `load_model`, `load_model_part`, `LoadedModel`
- `backbone`: `Backbone`, `backbone_of`, `ModelError`
- `adapters`: `LoraWeights`, `inject`, `read_adapters`, `write_adapters`, `export_peft`, `AdapterError`
- `loss`: `causal_lm_loss`, `IGNORE_INDEX`
- `runtime`: `resolve_runtime`
- `batched`: `BatchedPass`
- `usage`: `DeviceMeter`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.model.adapters import AdapterError as AdapterError
    from splitpeft.model.adapters import LoraWeights as LoraWeights
    from splitpeft.model.adapters import export_peft as export_peft
    from splitpeft.model.adapters import inject as inject
    from splitpeft.model.adapters import read_adapters as read_adapters
    from splitpeft.model.adapters import write_adapters as write_adapters
    from splitpeft.model.backbone import Backbone as Backbone
    from splitpeft.model.backbone import ModelError as ModelError
    from splitpeft.model.backbone import backbone_of as backbone_of
    from splitpeft.model.batched import BatchedPass as BatchedPass
    from splitpeft.model.loading import LoadedModel as LoadedModel
    from splitpeft.model.loading import load_model as load_model
    from splitpeft.model.loading import load_model_part as load_model_part
    from splitpeft.model.loss import IGNORE_INDEX as IGNORE_INDEX
    from splitpeft.model.loss import causal_lm_loss as causal_lm_loss
    from splitpeft.model.runtime import resolve_runtime as resolve_runtime
    from splitpeft.model.usage import DeviceMeter as DeviceMeter

_EXPORTS = {
    "load_model": "splitpeft.model.loading",
    "load_model_part": "splitpeft.model.loading",
    "LoadedModel": "splitpeft.model.loading",
    "Backbone": "splitpeft.model.backbone",
    "backbone_of": "splitpeft.model.backbone",
    "ModelError": "splitpeft.model.backbone",
    "LoraWeights": "splitpeft.model.adapters",
    "inject": "splitpeft.model.adapters",
    "read_adapters": "splitpeft.model.adapters",
    "write_adapters": "splitpeft.model.adapters",
    "export_peft": "splitpeft.model.adapters",
    "AdapterError": "splitpeft.model.adapters",
    "causal_lm_loss": "splitpeft.model.loss",
    "IGNORE_INDEX": "splitpeft.model.loss",
    "resolve_runtime": "splitpeft.model.runtime",
    "BatchedPass": "splitpeft.model.batched",
    "DeviceMeter": "splitpeft.model.usage",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
