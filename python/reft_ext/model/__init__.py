"""Patching a model with interventions:

    layers.py     where a model's decoder layers are, their hidden size, `layers=` parsing
    positions.py  position specs and (B, P) position tensors (pure functions)
    hooks.py      the hooks patch() installs and the per-model state they share
    patch.py      patch, unpatch, interventions, disabled, use_positions, ...

Nothing is re-exported here: a name like `patch` would shadow its module (reft_ext.model.patch);
the public names are reft_ext's.
"""
