"""``AttentionModel``: ``set_attn_implementation`` over a model and its named sub-models, as in transformers.

``set_attn_implementation`` takes a name (applied to the model and all its sub-models) or a dict keyed by
sub-model name, ``""`` being the model itself; every name is checked before anything changes.
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

from torch import nn

from ..registry import AttentionInterface

__all__ = ["AttentionModel", "Implementation", "check_implementation"]

Implementation = Union[str, Dict[str, "Implementation"]]


def check_implementation(name, interface: AttentionInterface) -> str:
    """``name`` if it is ``"eager"`` or registered in ``interface``; else a ValueError listing the valid names."""
    if not isinstance(name, str) or (name != "eager" and name not in interface):
        raise ValueError(f"attn_implementation={name!r} is not registered; valid: "
                         f"{', '.join(sorted(set(interface) | {'eager'}))} (register one with "
                         "triton_attn.registry.register_attention or AttentionInterface.register)")
    return name


class AttentionModel(nn.Module):
    """Base of our models: ``set_attn_implementation`` over the model and its named sub-models."""

    sub_model_names: Tuple[str, ...] = ()
    config: object
    attention_interface: AttentionInterface

    def sub_models(self) -> Dict[str, "AttentionModel"]:
        return {name: getattr(self, name) for name in self.sub_model_names}

    @property
    def attn_implementation(self) -> Union[str, Dict[str, object]]:
        """This model's implementation, or a dict with ``""`` and one entry per sub-model when it has them."""
        if not self.sub_model_names:
            return self.config.attn_implementation
        return {"": self.config.attn_implementation,
                **{name: model.attn_implementation for name, model in self.sub_models().items()}}

    def set_attn_implementation(self, attn_implementation: Implementation) -> None:
        """Switch attention implementation by name, without reloading weights.

        A str applies to this model and every sub-model. A dict maps sub-model names to a str or a
        nested dict, and ``""`` to this model itself; unmentioned parts keep their implementation.
        """
        subs = self.sub_models()
        if isinstance(attn_implementation, dict):
            unknown = set(attn_implementation) - set(subs) - {""}
            if unknown:
                raise KeyError(f"set_attn_implementation: unknown sub-model(s) {sorted(unknown)}; "
                               f"{type(self).__name__} has {sorted(subs) or 'none'} (and '' for itself)")
            own = attn_implementation.get("")
            plan = {name: attn_implementation[name] for name in subs if name in attn_implementation}
        else:
            own = attn_implementation
            plan = {name: attn_implementation for name in subs}
        # Check everything before changing anything, so that a bad name leaves the model as it was.
        self._check_plan(own, plan)
        for name, value in plan.items():
            subs[name].set_attn_implementation(value)
        if own is not None:
            self.config.attn_implementation = own

    def _check_plan(self, own, plan) -> None:
        if own is not None:
            check_implementation(own, self.attention_interface)
        subs = self.sub_models()
        for name, value in plan.items():
            if isinstance(value, dict):
                sub_own = value.get("")
                sub_plan = {k: v for k, v in value.items() if k != ""}
                unknown = set(sub_plan) - set(subs[name].sub_model_names)
                if unknown:
                    raise KeyError(f"set_attn_implementation: {name!r} has no sub-model(s) {sorted(unknown)}")
                subs[name]._check_plan(sub_own, sub_plan)
            else:
                subs[name]._check_plan(value, {k: value for k in subs[name].sub_model_names})
