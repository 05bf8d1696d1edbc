"""Integrations of moe_kernels into other frameworks (each optional: it imports its framework only
when imported itself).

* :mod:`moe_kernels.integrations.transformers`: ``experts_implementation="moe_kernels"`` for the
  Hugging Face transformers MoE models.
"""
