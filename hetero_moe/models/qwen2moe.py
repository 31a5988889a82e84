"""`qwen2moe`: Qwen1.5/Qwen2 MoE: q/k/v biases, a shared expert behind a sigmoid gate,
routing weights used as softmax probabilities without renormalisation."""
from ..gguf import GGUFFile
from .base import ROPE_NEOX, ArchSpec, ModelConfig, common_config, moe_config, register


def parse_config(g: GGUFFile) -> ModelConfig:
    m, kw = common_config(g, "qwen2moe", ROPE_NEOX)
    moe_config(m, kw)
    kw["n_ff_shexp"] = m.int("{arch}.expert_shared_feed_forward_length", 0)
    if kw["n_ff_shexp"] == 0 and "blk.0.ffn_up_shexp.weight" in g.tensors:
        kw["n_ff_shexp"] = g.tensors["blk.0.ffn_up_shexp.weight"].ne[1]
    kw["shexp_gate"] = True
    kw["attn_bias"] = True
    kw["norm_topk"] = False
    return ModelConfig(**kw)


SPEC = register(ArchSpec("qwen2moe", parse_config, "Qwen1.5/Qwen2 MoE"))
