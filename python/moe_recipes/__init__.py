"""moe_recipes: the example pretraining recipes of moe_kernels (X-Learner, INTERN, GPPF, MuST, MTHL).

Installed with the library (``pip install -e .`` maps ``python/moe_recipes``), built only on the
public ``moe_kernels`` API. Run one with ``moe-kernels pretrain <recipe> --preset <name>``.

* :mod:`moe_recipes.data`: the built-in procedural multi-source world and real datasets by path;
* :mod:`moe_recipes.models`: the Swin/DaViT-style MoE backbone, the (lego) ResNet, task heads;
* :mod:`moe_recipes.tasks`, :mod:`moe_recipes.metrics`: per-task heads, losses, evaluators, metrics;
* :mod:`moe_recipes.trainer`, :mod:`moe_recipes.optim`, :mod:`moe_recipes.config`: one trainer (exact
  resume), optimisers and schedules, typed presets (``presets/<recipe>/<preset>.toml``);
* :mod:`moe_recipes.recipes`: MTHL and GPPF (X-Learner, INTERN and MuST are the next ones).
"""
