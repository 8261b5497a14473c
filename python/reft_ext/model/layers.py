"""The decoder layers of a model: where they are, their hidden size, their layout, and
which of them a `layers=` argument names. Public helpers: find_layers, hidden_size."""
from __future__ import annotations

import operator
from collections import Counter

from torch import nn

__all__ = ["find_layers", "hidden_size", "normalise_layers", "seq_first"]


def _homogeneous(container: nn.Module) -> bool:
    children = list(container.children())
    return len(children) > 0 and len({type(c) for c in children}) == 1


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        ns = getattr(m, "_no_split_modules", None)
        if ns:
            names.update(ns)
    return names


def _gc_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        return GradientCheckpointingLayer
    except Exception:  # transformers missing or too old
        return None


def find_layers(model: nn.Module, layer_path: str | None = None) -> tuple[str, nn.Module]:
    """Finds the decoder-layer container of a model.

    Args:
        model: any nn.Module.
        layer_path: explicit dotted path of the container (e.g. "model.layers"), which must
            be an nn.ModuleList or nn.Sequential.

    Returns:
        (path relative to model, container). Rule: search inside ``model.get_decoder()``
        when the model has one (skips vision towers and encoders); among homogeneous
        ModuleList/Sequential containers prefer those whose blocks subclass transformers'
        GradientCheckpointingLayer or are named in a ``_no_split_modules``; otherwise take
        the homogeneous container holding the most parameters.

    Raises:
        ValueError when nothing is found or the choice is ambiguous (pass layer_path).
    """
    if layer_path is not None:
        try:
            c = model.get_submodule(layer_path)
        except AttributeError as e:
            raise ValueError(f"reft_ext.patch: layer_path {layer_path!r} not found in "
                             f"{type(model).__name__}: {e}") from None
        if not isinstance(c, (nn.ModuleList, nn.Sequential)) or len(c) == 0:
            raise ValueError(f"reft_ext.patch: layer_path {layer_path!r} is a "
                             f"{type(c).__name__}, expected a non-empty nn.ModuleList or "
                             f"nn.Sequential of layers")
        return layer_path, c

    root = model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
        except Exception:
            dec = None
        if isinstance(dec, nn.Module):
            root = dec
    prefix = ""
    if root is not model:
        prefix = next(n for n, m in model.named_modules() if m is root)
    cands = [(n, m) for n, m in root.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and _homogeneous(m)]
    if not cands:
        raise ValueError(f"reft_ext.patch: found no nn.ModuleList/nn.Sequential of layers in "
                         f"{type(model).__name__}; pass layer_path='...'")
    gc_cls = _gc_layer_class()
    no_split = _no_split_names(model)

    def preferred(m):
        block = next(iter(m.children()))
        return ((gc_cls is not None and isinstance(block, gc_cls))
                or type(block).__name__ in no_split)

    pref = [(n, m) for n, m in cands if preferred(m)]
    pool = pref or cands
    pool = sorted(pool, key=lambda nm: _n_params(nm[1]), reverse=True)
    if len(pool) > 1 and (pref or _n_params(pool[0][1]) == _n_params(pool[1][1])):
        # Preferred containers nested in one another (never seen) or unrelated: ambiguous.
        paths = [_join(prefix, n) for n, _ in pool]
        raise ValueError(f"reft_ext.patch: several candidate layer containers {paths}; pass "
                         f"layer_path= one of them")
    name, container = pool[0]
    return _join(prefix, name), container


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def hidden_size(model: nn.Module, layer: nn.Module) -> int:
    """d of the hidden states of ``layer`` (one block of ``model``'s layer container): from
    the model's (text) config, else nn.MultiheadAttention's embed_dim, else the most common
    length of the layer's 1-D parameters. Raises ValueError when none of these says."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if hasattr(cfg, "get_text_config"):
            try:
                cfg = cfg.get_text_config(decoder=True)
            except TypeError:
                cfg = cfg.get_text_config()
        for key in ("hidden_size", "n_embd", "d_model", "hidden_dim", "dim"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
    attn = getattr(layer, "self_attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        return attn.embed_dim
    sizes = Counter(p.shape[0] for p in layer.parameters() if p.dim() == 1)
    if sizes:
        (d, n), *rest = sizes.most_common()
        if not rest or rest[0][1] < n:
            return d
    raise ValueError("reft_ext.patch: cannot infer the hidden size of the layers; pass "
                     "hidden_size=")


def seq_first(layer: nn.Module) -> bool:
    """True for nn.Transformer* layers built with batch_first=False: (T, B, d) states."""
    if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not layer.self_attn.batch_first
    return False


def normalise_layers(layers, n: int, what: str = "reft_ext.patch: layers") -> list[int]:
    """Indices of the layers that ``layers`` ("all", an int or a sequence of ints, negative
    counting from the end) names among n, as non-negative ints in the given order; raises
    ValueError, its message starting with ``what``, when one is out of range or repeated.
    (patch() and the CLI's --layers share it.)"""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"{what} must be 'all', an int or a list of ints, got {layers!r}")
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        try:
            j = operator.index(i)
        except TypeError:
            j = None
        if j is None or isinstance(i, bool) or not -n <= j < n:
            raise ValueError(f"{what}: layer {i!r} is out of range (the model has {n} layers: "
                             f"0..{n - 1})")
        out.append(j % n)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"{what} must be non-empty without repeats, got {list(layers)}")
    return out
