"""Placement: which tier (GPU or CPU) holds and runs each weight.

Dense work (attention, norms, router, shared experts, embeddings, lm_head, hot experts) belongs to
the GPU tier; routed experts to the CPU tier. Without CUDA the GPU tier runs on the CPU with the same
kernels as the CPU tier, so a CPU-only run is just a plan where every tier's device is "cpu".
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


@dataclass
class PlacementPlan:
    """Where each weight lives. `hot_experts[layer]` are routed experts promoted to the GPU tier."""
    gpu_device: str = "cpu"                       # "cuda:0" when a GPU is present
    hot_experts: dict[int, frozenset[int]] = field(default_factory=dict)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_device != "cpu"

    def tier_of(self, tensor_name: str) -> Tier:
        """Routed expert stacks go to the CPU tier, everything else to the GPU tier."""
        return Tier.CPU if "_exps." in tensor_name else Tier.GPU

    def device_of(self, tier: Tier) -> str:
        return self.gpu_device if tier is Tier.GPU else "cpu"

    def experts_on_gpu(self, layer: int) -> frozenset[int]:
        return self.hot_experts.get(layer, frozenset())


def plan_placement(gpu: str | bool | None = "auto") -> PlacementPlan:
    """Plan for this machine. gpu: "auto" (CUDA if present), False/"cpu", or a device string."""
    if gpu in (False, None, "cpu", "none"):
        return PlacementPlan()
    if gpu in (True, "auto"):
        if torch.cuda.is_available():
            return PlacementPlan(gpu_device="cuda:0")
        if gpu is True:
            raise RuntimeError("gpu=True was requested but torch sees no CUDA device")
        return PlacementPlan()
    return PlacementPlan(gpu_device=str(gpu))
