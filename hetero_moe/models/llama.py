"""`llama`: dense Llama-family models and Mixtral-style MoE (`ffn_*_exps` in the llama arch)."""
from ..gguf import GGUFFile
from .base import ROPE_NORM, ArchSpec, ModelConfig, common_config, moe_config, register


def parse_config(g: GGUFFile) -> ModelConfig:
    m, kw = common_config(g, "llama", ROPE_NORM)
    moe_config(m, kw, ff_key="{arch}.feed_forward_length")
    if kw.get("n_expert"):
        kw["norm_topk"] = True  # Mixtral renormalises the top-k softmax weights
    return ModelConfig(**kw)


SPEC = register(ArchSpec("llama", parse_config, "Llama / Mistral / SmolLM; Mixtral-style MoE"))
