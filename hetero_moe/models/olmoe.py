"""`olmoe`: OLMoE: q/k RMSNorm over the whole projection, softmax routing without renormalisation."""
from ..gguf import GGUFFile
from .base import ROPE_NEOX, ArchSpec, ModelConfig, common_config, moe_config, register


def parse_config(g: GGUFFile) -> ModelConfig:
    m, kw = common_config(g, "olmoe", ROPE_NEOX)
    moe_config(m, kw)
    kw["norm_topk"] = False
    kw["qk_norm"] = "full"
    return ModelConfig(**kw)


SPEC = register(ArchSpec("olmoe", parse_config, "OLMoE"))
