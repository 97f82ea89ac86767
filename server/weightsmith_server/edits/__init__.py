"""Typed edit operations on a model's variables, one module per family.

- `arithmetic`: assign (whole or a slice), scale, add, add_noise, clip
- `initializers`: reinitialize with a builtin Keras initializer
- `pruning`: magnitude pruning, element-wise or output channels
- `quantization`: symmetric n-bit fake quantization
- `merging`: interpolate, task_vector, copy_from (other models)
- `surgery`: set_trainable, replace_head (architecture changes)

`engine.apply_edits` runs a batch on a working copy (`context.EditContext`)
and commits it as one revision.
"""
