"""`qwen3moe`: Qwen3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k RMSNorm, no shared expert."""
from ..gguf import GGUFFile
from .base import ROPE_NEOX, ArchSpec, ModelConfig, common_config, moe_config, register


def parse_config(g: GGUFFile) -> ModelConfig:
    m, kw = common_config(g, "qwen3moe", ROPE_NEOX)
    moe_config(m, kw)
    kw["norm_topk"] = m.bool("{arch}.expert_weights_norm", True)
    kw["qk_norm"] = "head"
    return ModelConfig(**kw)


SPEC = register(ArchSpec("qwen3moe", parse_config, "Qwen3 MoE"))
