"""The Chronos-MoE modules (architecture.md).

`PRESETS` and the config are torch-free, so the planner can import them without loading torch;
`build_model` and the modules load torch on first use.
"""

from .config import ARCHITECTURES, DISPATCH_MODES, ChronosMoEConfig, make_config
from .presets import PRESETS, BackboneDims, dims_from_hf_config, resolve_dims

__all__ = [
    "ARCHITECTURES",
    "DISPATCH_MODES",
    "PRESETS",
    "BackboneDims",
    "ChronosMoEConfig",
    "build_model",
    "dims_from_hf_config",
    "make_config",
    "make_expert_parallel",
    "resolve_dims",
    "upcycle",
]


def __getattr__(name: str):
    # Loaded lazily: importing torch costs seconds, and the planner never needs it.
    if name == "build_model":
        from .build import build_model

        return build_model
    if name == "make_expert_parallel":
        from .expert_parallel import make_expert_parallel

        return make_expert_parallel
    if name == "upcycle":
        from .upcycle import upcycle  # binds model.upcycle to the submodule: rebind it to the function

        globals()["upcycle"] = upcycle
        return upcycle
    raise AttributeError(f"module 'model' has no attribute {name!r}")
