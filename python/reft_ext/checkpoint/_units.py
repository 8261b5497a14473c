"""The units a checkpoint stores: one per intervention module. A tied layer i is unit "i";
member k of an untied layer i (reft_ext.bank.Untied) is unit "i#k", as pyreft names its
untied interventions. Tensors are "layers.{unit}.{name}"."""
from __future__ import annotations

from torch import nn

from ..bank import Untied
from ..model.patch import UNTIED_GROUPS


def units(mods: dict[int, nn.Module]) -> dict[str, nn.Module]:
    """{unit key: intervention module} of {layer: module} (interventions(model))."""
    out: dict[str, nn.Module] = {}
    for i, m in mods.items():
        if isinstance(m, Untied):
            out.update({f"{i}#{k}": member for k, member in enumerate(m.members)})
        else:
            out[str(i)] = m
    return out


def unit_keys(layers: list[int], tied: bool) -> list[str]:
    """The unit keys of a checkpoint of these layers, in layer order."""
    if tied:
        return [str(i) for i in layers]
    return [f"{i}#{k}" for i in layers for k in range(UNTIED_GROUPS)]


def layer_of(key: str) -> int:
    return int(key.split("#", 1)[0])
