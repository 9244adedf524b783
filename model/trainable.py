"""Which parameters learn: the fine-tuning regimes (architecture.md §6).

`trainable` is a regime name or a comma-separated set of breakdown components (model.components):

- `all`: every parameter (pretraining, or continuing an upcycled model);
- `experts_and_router`: a pretrained dense backbone frozen, the routers and experts learn;
- `experts`: only the experts (expert heads, expert encoders, expert FFNs);
- `router`: only the routers (the sample-level router, or every token_ffn block's token router);
- e.g. `decoder_ffn,expert_head`: exactly those components.

Frozen parameters get `requires_grad=False`: no gradient, no optimizer state, no weight-gradient work.
Torch-free apart from `set_trainable`, which takes a model.
"""

from __future__ import annotations

from typing import Any, Iterable

from .checks import SettingError
from .components import COMPONENTS, component_of_param

EXPERT_COMPONENTS = ("expert_encoder", "expert_ffn", "expert_head")
REGIMES = {
    "all": COMPONENTS,
    "experts_and_router": ("router", *EXPERT_COMPONENTS),
    "experts": EXPERT_COMPONENTS,
    "router": ("router",),
}
SHOWN_CHARS = 60


def normalize_trainable(trainable: object) -> str:
    """The canonical text of a regime: a regime name as it is, a component set in COMPONENTS order (a
    set naming every component is `all`). SettingError naming `trainable` for anything else."""
    if isinstance(trainable, str):
        names = [part.strip() for part in trainable.split(",") if part.strip()]
    elif isinstance(trainable, Iterable):
        names = [str(part).strip() for part in trainable]
    else:
        names = []
    if len(names) == 1 and names[0] in REGIMES:
        return names[0]
    unknown = [name for name in names if name not in COMPONENTS]
    if not names or unknown:
        shown = (repr(unknown[0]) if unknown else repr(trainable))[:SHOWN_CHARS]
        raise SettingError("trainable", f"trainable must be one of {', '.join(REGIMES)} or a comma-separated set "
                                        f"of components ({', '.join(COMPONENTS)}), got {shown}")
    chosen = tuple(component for component in COMPONENTS if component in names)
    return "all" if chosen == COMPONENTS else ",".join(chosen)


def trainable_components(trainable: str) -> frozenset[str]:
    """The components a (normalised or raw) regime trains."""
    canonical = normalize_trainable(trainable)
    return frozenset(REGIMES.get(canonical) or canonical.split(","))


def nothing_trainable_message(trainable: str, label: str) -> str:
    return (f"trainable {trainable} leaves nothing to train in {label} (it has no parameters in "
            f"{', '.join(sorted(trainable_components(trainable)))}); choose components the model has")


def set_trainable(model: Any, trainable: str) -> int:
    """Set `requires_grad` on every parameter of `model` by its component; return the trainable count.
    SettingError when the regime leaves nothing trainable (e.g. `experts` on the dense model)."""
    components = trainable_components(trainable)
    count = 0
    for name, parameter in model.named_parameters():  # tied tensors appear once
        learns = component_of_param(name) in components
        parameter.requires_grad_(learns)
        count += parameter.numel() if learns else 0
    if count == 0:
        raise SettingError("trainable", nothing_trainable_message(normalize_trainable(trainable),
                                                                  model.config.label))
    return count
