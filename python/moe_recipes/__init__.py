"""moe_recipes: the example pretraining recipes of moe_kernels (X-Learner, INTERN, GPPF, MuST, MTHL).

Installed with the library (``pip install -e .`` maps ``python/moe_recipes``), built only on the
public ``moe_kernels`` API. So far: the built-in data, :mod:`moe_recipes.data.world`.
"""
