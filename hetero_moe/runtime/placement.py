"""Placement: the executor's side of a planner `Plan` — which tier holds each tensor, on which
device the GPU tier's tensors live, and how many bytes the GPU tier really holds.

Tiers: CPU (routed experts, embeddings, anything a plan leaves in DRAM: read in place from the
mmap by the C++ kernels) and GPU (CUDA, or under `gpu="interpret"` CPU tensors that the Triton
kernels run on through Triton's interpreter). A CPU-only run is a placement without a GPU tier.

What the GPU tier holds of a tensor (`gpu_resident_bytes`, shared with the planner so plan and
executor agree byte for byte): GGUF blocks as stored for types with a Triton kernel; float16 for
matrices of other types (dequantized once at load) and for MLA's per-head k_b / v_b / kv_b; float32
for vectors (norms, biases) and routers, which the layers use as float tensors.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import torch

# ggml types the GPU tier multiplies in their own blocks (hetero_moe.kernels.triton.gguf.SUPPORTED;
# a test keeps the two equal): F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16
GPU_BLOCK_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30})
DEQUANT_DTYPE = torch.float16            # other matrices, and MLA's k_b / v_b, on the GPU tier
_PER_HEAD = re.compile(r"\.attn_(k_b|v_b|kv_b)\.weight$")
_FLOAT_GROUPS = ("norms", "router")
STAGING_BYTES = 64 << 20                 # pinned host buffer for uploads to CUDA


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


def gpu_resident_bytes(name: str, ggml_type: int, ne: tuple[int, ...], nbytes: int) -> int:
    """Bytes the GPU tier holds for this tensor (see the module doc)."""
    from .planner import group_of
    n = 1
    for d in ne:
        n *= d
    if len(ne) == 1 or group_of(name) in _FLOAT_GROUPS:
        return 4 * n
    if _PER_HEAD.search(name) or ggml_type not in GPU_BLOCK_TYPES:
        return 2 * n
    return nbytes


def experts_as_blocks(types) -> bool:
    """Whether a layer's hot experts stay in their blocks on the GPU tier (the grouped Triton
    kernel needs all of gate/up/down to have a kernel); else all three are held in float16."""
    return all(t in GPU_BLOCK_TYPES for t in types)


def expert_gpu_bytes(stacks, n_expert: int) -> int:
    """What one hot expert of a layer costs the GPU tier; stacks: the gate/up/down TensorInfos."""
    if experts_as_blocks(t.ggml_type for t in stacks):
        return sum(t.nbytes // n_expert for t in stacks)
    return sum(2 * (t.n_elements // n_expert) for t in stacks)


@dataclass
class PlacementPlan:
    """Where each weight lives while the model runs.

    mode: "none" (CPU only), "cuda" or "interpret". `plan` is the planner's Plan (None for CPU
    only). `held` records every tensor put on the GPU tier (name -> bytes)."""
    mode: str = "none"
    plan: object = None
    held: dict[str, int] = field(default_factory=dict)
    stream_min_tokens: int | None = None    # runtime/hetero.py; None: its default rule
    _staging: torch.Tensor | None = field(default=None, repr=False)

    @property
    def has_gpu(self) -> bool:
        return self.mode != "none"

    @property
    def gpu_device(self) -> str:
        """The torch device of GPU-tier tensors ("cpu" under the interpreter)."""
        return "cuda:0" if self.mode == "cuda" else "cpu"

    @property
    def cache_dtype(self) -> torch.dtype | None:
        """The GPU tier's KV cache type from the plan (None: the CPU path's default)."""
        if not self.has_gpu:
            return None
        return {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[
            self.plan.cache_type]

    def tier_of(self, tensor_name: str) -> Tier:
        """The tier of a tensor. Routed expert stacks are CPU-tier tensors: their hot experts'
        GPU copies come from `experts_on_gpu`."""
        if not self.has_gpu:
            return Tier.CPU
        return Tier.GPU if self.plan.placement.get(tensor_name, "cpu") == "gpu" else Tier.CPU

    def device_of(self, tier: Tier) -> str:
        return self.gpu_device if tier is Tier.GPU else "cpu"

    def experts_on_gpu(self, layer: int) -> list[int]:
        return self.plan.experts_on_gpu(layer) if self.has_gpu else []

    def put(self, name: str, t: torch.Tensor, tier: Tier = Tier.GPU) -> torch.Tensor:
        """`t` on the tier's device. A GPU-tier tensor is always a copy of its own (under the
        interpreter too, so the bytes held are real) and is counted in `held`."""
        if tier is not Tier.GPU or not self.has_gpu:
            return t
        if self.mode == "cuda" and t.device.type == "cpu":
            out = self._upload(t.contiguous())
        else:
            out = t.to(self.gpu_device, copy=True).contiguous()
        self.held[name] = self.held.get(name, 0) + out.numel() * out.element_size()
        return out

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device through a reused pinned buffer, in STAGING_BYTES pieces: the source
        (often the read-only mmap) is read once and never pinned or copied whole."""
        out = torch.empty(t.shape, dtype=t.dtype, device=self.gpu_device)
        src, dst = t.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        if self._staging is None:
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
        for off in range(0, src.numel(), STAGING_BYTES):
            n = min(STAGING_BYTES, src.numel() - off)
            self._staging[:n].copy_(src[off:off + n])
            dst[off:off + n].copy_(self._staging[:n], non_blocking=True)
            torch.cuda.current_stream().synchronize()    # the buffer is reused next piece
        return out

    def held_bytes(self, prefix: str = "") -> int:
        return sum(v for k, v in self.held.items() if k.startswith(prefix))


def plan_placement(gpu: str | bool | None = "auto", plan=None) -> PlacementPlan:
    """Placement for this machine. gpu: "auto" (CUDA if present, else CPU only), False/"cpu"/
    "none", True/"cuda", or "interpret" (the GPU tier on CPU tensors through Triton's
    interpreter; for tests and debugging). A GPU placement needs the planner's `plan`."""
    if gpu in (False, None, "cpu", "none"):
        return PlacementPlan()
    if gpu == "auto":
        gpu = "cuda" if torch.cuda.is_available() else "none"
        if gpu == "none":
            return PlacementPlan()
    if gpu in (True, "cuda", "cuda:0"):
        if not torch.cuda.is_available():
            raise RuntimeError("gpu='cuda' was requested but torch sees no CUDA device")
        mode = "cuda"
    elif gpu == "interpret":
        mode = "interpret"
    else:
        raise ValueError(f"gpu must be 'auto', 'cuda', 'interpret', 'none' or a bool, got {gpu!r}")
    if plan is None:
        raise ValueError("a GPU placement needs a plan (hetero_moe.plan)")
    return PlacementPlan(mode=mode, plan=plan)
