"""Tiny random transformers MoE modules built offline (no download): every experts class of the
installed transformers that is decorated with ``@use_experts_implementation``, and whole tiny models
of the families the integration tests compare end to end."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

HIDDEN, INTER, EXPERTS = 32, 16, 6


def experts_classes() -> list:
    """(family, module, class name) of every decorated experts class, found in the sources."""
    import transformers.models as tm

    out = []
    for f in sorted(Path(tm.__file__).parent.glob("*/modeling_*.py")):
        src = f.read_text()
        if "@use_experts_implementation" not in src:
            continue
        for name in re.findall(r"@use_experts_implementation(?:\([^)]*\))?\s*\nclass (\w+)\(", src):
            out.append((f.parent.name, f"transformers.models.{f.parent.name}.{f.stem}", name))
    return out


_SMALL = [  # (pattern on an int attribute's name, tiny value); first match wins
    (r"experts_per_tok|top_?k|topk|n_group|num_expert_group|moe_k$", 2),
    (r"shared_expert", 1),
    (r"expert", EXPERTS),
    (r"^hidden_size$|^d_model$|^n_embd$|^dim$", HIDDEN),
    (r"size|dim", INTER),
]


def _shrink(cfg, seen=None) -> None:
    seen = seen if seen is not None else set()
    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    for key, value in list(vars(cfg).items()):
        if key.startswith("_"):
            continue
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            _shrink(value, seen)
            continue
        if value is None or (isinstance(value, (list, tuple)) and value and isinstance(value[0], int)):
            # MoE switched off by default (None) or one size per part (a list): give it one tiny value
            if re.search(r"^(num_local_experts|num_experts|n_routed_experts|moe_intermediate_size)$", key):
                small = INTER if "size" in key else EXPERTS
                setattr(cfg, key, [small] * len(value) if isinstance(value, (list, tuple)) else small)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 2:
            continue
        for pattern, small in _SMALL:
            if re.search(pattern, key):
                setattr(cfg, key, min(value, small))
                break


def _configs(family: str, module: str):
    """Candidate configs for the experts class: the family's config classes, shrunk, and their
    sub-configs (a multimodal model's experts live in its text config)."""
    mod = importlib.import_module(module.replace(".modeling_", ".configuration_"))
    for name in dir(mod):
        c = getattr(mod, name)
        if isinstance(c, type) and name.endswith("Config") and c.__module__ == mod.__name__:
            try:
                cfg = c()
            except Exception:  # noqa: BLE001  (a config that needs arguments: try the others)
                continue
            _shrink(cfg)
            yield cfg
            for v in vars(cfg).values():
                if hasattr(v, "to_dict") and hasattr(v, "model_type"):
                    yield v


def build_experts(family: str, module: str, name: str, dtype=torch.float32, seed: int = 0):
    """A tiny experts module with random parameters, or raise with the reason."""
    import inspect

    cls = getattr(importlib.import_module(module), name)
    # an experts class sized by its caller (one size per modality) gets the tiny size
    extra = {"intermediate_size": INTER} if "intermediate_size" in inspect.signature(cls.__init__).parameters else {}
    errors = []
    for cfg in _configs(family, module):
        try:
            with torch.device("meta"):
                meta = cls(cfg, **extra)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(cfg).__name__}: {type(exc).__name__}: {exc}")
            continue
        numel = sum(p.numel() for p in meta.parameters())
        if numel > 2_000_000:
            errors.append(f"{type(cfg).__name__}: still {numel} parameters after shrinking")
            continue
        torch.manual_seed(seed)
        m = cls(cfg, **extra)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        return m.to(dtype), cfg
    raise RuntimeError("; ".join(errors) or "no config class")


def tiny_model_config(family: str, layers: int = 2):
    """A tiny config of a whole model (``layers`` layers, 6-8 experts, top-2) for the end-to-end tests."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=INTER, num_key_value_heads=2, num_local_experts=EXPERTS,
                                num_experts_per_tok=2, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=2 * INTER, moe_intermediate_size=INTER, num_key_value_heads=2,
                                 head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1,
                                 mlp_only_layers=[], norm_topk_prob=True, **common)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=INTER, num_key_value_heads=4, num_experts=EXPERTS,
                              num_experts_per_tok=2, **common)
    if family == "gpt_oss":
        return tf.GptOssConfig(intermediate_size=INTER, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
                               num_experts_per_tok=2, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"][:layers], **common)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(intermediate_size=2 * INTER, moe_intermediate_size=INTER, num_key_value_heads=4,
                                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                                   topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)
    raise KeyError(family)


MODEL_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def tiny_model(family: str, implementation: str, dtype=torch.float32, seed: int = 0, layers: int = 2):
    """The tiny model of ``family`` with random weights (the same for every implementation and in
    every process: the expert and router weights are seeded from a CRC of their name, not from
    Python's per-process randomised ``hash``)."""
    import zlib

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_model_config(family, layers), experts_implementation=implementation)
    with torch.no_grad():  # expert weights start as torch.empty in some families
        for name, p in m.named_parameters():
            if "experts" in name or "router" in name or name.endswith("gate.weight"):
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.to(dtype)
