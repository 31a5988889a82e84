"""QuantLinear: a linear layer whose weight stays in its GGUF blocks.

The layer owns its parameters (raw bytes, type, shape, placement); a method object owns layout and
math (`process_weights_after_loading`, `apply`). Which method runs is decided from the quant table
and the placement, so swapping in a faster kernel is a change to the table, not to the layers.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import quant
from ..errors import GGUFFormatError
from ..gguf import TensorInfo
from ..quant.act import fake_quant
from ..runtime.placement import DEQUANT_DTYPE, GPU_BLOCK_TYPES, Tier


F32 = 0


def float_tensor(t: TensorInfo) -> torch.Tensor:
    """A small float tensor (norm weight, bias, router) as a float32 torch tensor.

    F32 tensors are views of the read-only mmap (no second copy in memory): callers never write
    into them."""
    if t.ggml_type == F32 and t.data.ctypes.data % 4 == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # "not writable": the view is only ever read
            return torch.from_numpy(t.data.view(np.float32).reshape(t.shape))
    return quant.dequantize(t.data, t.ggml_type, t.shape).float().contiguous()


@dataclass
class KernelOptions:
    """Which CPU matmul path to use: "auto" (C++ kernels when built), "torch" (dequantize + matmul).

    repack: weights the C++ kernels have a row-interleaved layout for (Q4_0, Q5_0; Q2_K, Q3_K,
    Q4_K, Q6_K, Q8_0, IQ4_NL and IQ4_XS with VNNI) are converted to it at load (sixteen rows share
    each activation load); the copy replaces the mapped pages (`release(tensor_name)` drops them
    from this process). load() decides (repack="auto").
    """
    cpu_kernels: str = "auto"
    act_quant: bool = True   # torch path: quantize activations like the CPU kernels do
    repack: bool = False
    release: object = None   # callable(tensor name, part=None): drop the tensor's mapped pages
    #                          (part: (lo, hi) bytes of it, a slice converted so far)


# The embedding table is read a row at a time (and is the lm_head of tied models): it keeps the GGUF
# rows. A separate lm_head is repacked: its one-token GEMV streams the 16-row layout as fast as the
# plain one from memory (a3b's Q6_K lm_head, Zen 4, 2 threads: 1.00x) and computes ~1.5-1.9x faster
# from cache, which is what bounds it where memory is faster than the plain kernels.
NOT_REPACKED = frozenset({"token_embd.weight"})
REPACK_CHUNK_BYTES = 16 << 20   # larger tensors are converted (and their pages released) in slices


def kernel_weights(t_name: str, raw, ggml_type: int, n_rows: int, n_cols: int,
                   options: "KernelOptions"):
    """(bytes, type) the C++ kernels multiply: the GGUF blocks as mapped, or their row-interleaved
    copy when options.repack and the kernels have a layout for the type (rows a multiple of its
    group); the mapped pages of a repacked tensor are then released."""
    if not options.repack or not isinstance(raw, np.ndarray) or t_name in NOT_REPACKED \
            or not raw.flags.c_contiguous:    # a pipeline stage's placeholder for another's tensor
        return raw, ggml_type
    from .. import cpu_backend
    to = cpu_backend.repacked_type(ggml_type) if cpu_backend.repack_pays(ggml_type) else None
    if to is None or n_rows % cpu_backend.type_info(to)["group"]:
        return raw, ggml_type
    group = cpu_backend.type_info(to)["group"]
    src_row, dst_row = cpu_backend.row_bytes(ggml_type, n_cols), cpu_backend.row_bytes(to, n_cols)
    if options.release is None or raw.nbytes <= REPACK_CHUNK_BYTES:
        packed = cpu_backend.repack(raw, ggml_type, n_rows, n_cols)
    else:
        # a large tensor a slice of row groups at a time, each slice's mapped pages released as
        # soon as it is converted: the process never holds a whole tensor twice (~40 MiB less
        # peak on the a3b preset's 113 MiB expert stacks)
        packed = cpu_backend._huge_buffer(n_rows * dst_row)
        step = max(group, REPACK_CHUNK_BYTES // (src_row * group) * group)
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            cpu_backend.repack(raw[r0 * src_row:r1 * src_row], ggml_type, r1 - r0, n_cols,
                               out=packed[r0 * dst_row:r1 * dst_row])
            options.release(t_name, (r0 * src_row, r1 * src_row))
    if options.release is not None:
        options.release(t_name)
    return packed, to


class DequantMatmulMethod:
    """Dequantize the whole weight to float32 once at load, then torch matmul.

    Fast for small dense weights; costs 4 bytes per weight of RAM.
    """
    name = "torch-f32"

    def process_weights_after_loading(self, layer: "QuantLinear") -> None:
        layer.w_f32 = quant.dequantize(layer.raw, layer.ggml_type, (layer.n_out, layer.n_in))
        layer.w_f32 = layer.w_f32.to(layer.device)

    def apply(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        if layer.act_quant:
            x = fake_quant(x, layer.ggml_type)
        return x @ layer.w_f32.T


class CpuKernelMethod:
    """Quantized matmul straight from the mmap with the C++ kernels (no float copy of the weight)."""
    name = "cpu-kernel"

    def process_weights_after_loading(self, layer: "QuantLinear") -> None:
        layer.kraw, layer.ktype = kernel_weights(layer.name, layer.raw, layer.ggml_type,
                                                 layer.n_out, layer.n_in, layer.options)

    def apply(self, layer: "QuantLinear", x: torch.Tensor, out=None) -> torch.Tensor:
        kernel = quant.QUANT_TYPES[layer.ggml_type].cpu_kernel
        return kernel.matmul(layer.kraw, layer.ktype, layer.n_out, layer.n_in,
                             x.float().contiguous(), out=out)


def register_cpu_kernels() -> None:
    """Fill the quant table's CPU-kernel slot for every type the C++ extension supports."""
    try:
        from .. import cpu_backend
    except ImportError:
        return
    if not cpu_backend.available():
        return
    for t, qt in list(quant.QUANT_TYPES.items()):
        if qt.cpu_kernel is None and cpu_backend.supports(t):
            quant.set_kernels(t, cpu_kernel=cpu_backend)


def cpu_kernels_usable(ggml_type: int, options: KernelOptions) -> bool:
    """The table says whether a CPU kernel serves this type (the one place dispatch looks)."""
    if options.cpu_kernels == "torch":
        return False
    register_cpu_kernels()
    return quant.quant_type(ggml_type).cpu_kernel is not None


class GpuBlockMethod:
    """GPU tier: the weight's GGUF blocks copied once to the device (VRAM = file bytes), multiplied
    by the Triton kernels with dequantization in registers (hetero_moe.kernels.triton.gguf). Under
    gpu="interpret" the "device" copy is a CPU tensor and the kernels run in Triton's interpreter."""
    name = "gpu-blocks"

    def process_weights_after_loading(self, layer: "QuantLinear") -> None:
        raw = quant._as_bytes(layer.raw)
        layer.w_dev = layer.placement.put(layer.key, raw)

    def apply(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        kernel = quant.QUANT_TYPES[layer.ggml_type].gpu_kernel or register_gpu_kernels(
            layer.ggml_type)
        return kernel.matmul(x.float().contiguous(), layer.w_dev, layer.ggml_type, layer.n_out,
                             layer.n_in)


def register_gpu_kernels(ggml_type: int | None = None):
    """Fill the quant table's GPU-kernel slot for every type the Triton kernels support (on first
    use: importing triton is slow); returns the kernel of `ggml_type`."""
    from ..kernels.triton import gguf as gk
    for t in gk.SUPPORTED:
        if quant.QUANT_TYPES[t].gpu_kernel is None:
            quant.set_kernels(t, gpu_kernel=gk)
    return None if ggml_type is None else quant.QUANT_TYPES[ggml_type].gpu_kernel


class GpuDequantMethod:
    """GPU tier, a type without a Triton kernel: dequantized once to float16 on the device."""
    name = "gpu-f16"

    def process_weights_after_loading(self, layer: "QuantLinear") -> None:
        w = quant.dequantize(layer.raw, layer.ggml_type, (layer.n_out, layer.n_in))
        layer.w_dev = layer.placement.put(layer.key, w.to(DEQUANT_DTYPE))

    def apply(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:      # f16 inputs, fp32 accumulation
            return (x.to(layer.w_dev.dtype) @ layer.w_dev.T).float()
        return x.float() @ layer.w_dev.float().T


def select_method(ggml_type: int, tier: Tier, device: str, options: KernelOptions,
                  placement=None):
    """The GPU tier (a placement with a GPU) multiplies on the device; the CPU tier uses the C++
    kernels when built, else the torch reference."""
    if tier is Tier.GPU and placement is not None and placement.has_gpu:
        return GpuBlockMethod() if ggml_type in GPU_BLOCK_TYPES else GpuDequantMethod()
    if device == "cpu" and cpu_kernels_usable(ggml_type, options):
        return CpuKernelMethod()
    return DequantMatmulMethod()


class QuantLinear:
    """y = x @ W.T (+ b) with W [n_out, n_in] in any supported GGUF type."""

    def __init__(self, t: TensorInfo, tier: Tier, device: str, options: KernelOptions,
                 bias: TensorInfo | None = None, placement=None, key: str | None = None):
        """placement: the PlacementPlan (GPU-tier copies are made and counted through it);
        key: the name the weight is held under (default its tensor name; the tied lm_head is
        token_embd held as output.weight)."""
        if len(t.ne) != 2:
            raise GGUFFormatError(f"{t.path}: tensor {t.name!r} should be 2-D, has shape "
                                  f"{list(t.shape)}")
        quant.quant_type(t.ggml_type, tensor=t.name, file=t.path)
        self.name = t.name
        self.raw = t.data
        self.ggml_type = t.ggml_type
        self.n_out, self.n_in = t.shape
        self.tier, self.device = tier, device
        self.placement, self.key = placement, key or t.name
        self.bias = None
        if bias is not None:
            self.bias = float_tensor(bias).to(device) if placement is None else \
                placement.put(bias.name, float_tensor(bias), tier)
        if self.bias is not None and self.bias.shape != (self.n_out,):
            raise GGUFFormatError(f"{bias.path}: bias {bias.name!r} has shape {list(bias.shape)}, "
                                  f"expected [{self.n_out}]")
        self.act_quant = options.act_quant
        self.options = options
        self.kraw, self.ktype = self.raw, self.ggml_type   # what the C++ kernels multiply
        self.method = select_method(t.ggml_type, tier, device, options, placement)
        self.method.process_weights_after_loading(self)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, n_in] -> [T, n_out]; out: a [T, n_out] float32 tensor the C++ kernels may write
        into (a hint: other methods, and a bias, return a new tensor)."""
        if self.tier is Tier.CPU and x.device.type != "cpu":      # a CPU-tier weight, GPU x
            return self(x.float().cpu()).to(x.device)
        if out is not None and isinstance(self.method, CpuKernelMethod) and x.dim() == 2:
            y = self.method.apply(self, x, out=out)
        else:
            y = self.method.apply(self, x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def __repr__(self) -> str:
        return (f"QuantLinear({self.name}, {quant.type_name(self.ggml_type)}, "
                f"[{self.n_out}, {self.n_in}], {self.tier.value}, {self.method.name})")


def apply_group(layers: "list[QuantLinear]", x: torch.Tensor, outs=None) -> list[torch.Tensor]:
    """[layer(x) for layer in layers]; layers on the C++ kernels share one job (x quantized once).
    outs: optional [T, n_out] float32 tensors for the C++ kernels to write into (a hint)."""
    if len(layers) > 1 and x.is_cpu and all(isinstance(l.method, CpuKernelMethod)
                                            for l in layers) \
            and len({l.n_in for l in layers}) == 1 and len(layers) <= 4:
        kernel = quant.QUANT_TYPES[layers[0].ggml_type].cpu_kernel
        ys = kernel.matmul_multi([(l.kraw, l.ktype, l.n_out) for l in layers], layers[0].n_in,
                                 x.float().contiguous(), outs=outs)
        return [y if l.bias is None else y + l.bias for l, y in zip(layers, ys)]
    return [l(x) for l in layers]


class Embedding:
    """Row lookup straight from the quantized table: only the rows asked for are dequantized.

    Rows are read with pread, not through the mmap: touching a mapped row maps the pages around
    it too (the kernel's fault-around), so random token ids would pull most of a large table into
    the process's resident memory."""

    def __init__(self, t: TensorInfo, device: str):
        if len(t.ne) != 2:
            raise GGUFFormatError(f"{t.path}: tensor {t.name!r} should be 2-D")
        self.n_vocab, self.n_embd = t.shape
        self.ggml_type = t.ggml_type
        self.row_bytes = quant.row_bytes(t.ggml_type, self.n_embd)
        self.rows = t.data.reshape(self.n_vocab, self.row_bytes)
        self.path, self.offset = t.path, t.offset
        self._fd: int | None = None
        self.device = device

    def _read_rows(self, idx: np.ndarray) -> np.ndarray:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                self._fd = -1
        if self._fd < 0:                       # file gone (or a buffer-backed tensor): the map
            return np.ascontiguousarray(self.rows[idx])
        rb = self.row_bytes
        out = np.empty((len(idx), rb), dtype=np.uint8)
        for i, r in enumerate(idx.tolist()):
            b = os.pread(self._fd, rb, self.offset + r * rb)
            if len(b) != rb:
                raise GGUFFormatError(f"{self.path}: short read of embedding row {r}")
            out[i] = np.frombuffer(b, dtype=np.uint8)
        return out

    def file_source(self) -> tuple[int, int] | None:
        """(open file descriptor, byte offset) of the table for readers of single rows (the fused
        decode step reads its token's row itself), or None when the table is no file's bytes."""
        if self._fd is None:
            self._read_rows(np.zeros(1, dtype=np.int64))    # opens the file (or finds it gone)
        return (self._fd, self.offset) if self._fd >= 0 else None

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd >= 0:
            os.close(self._fd)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, n_embd]
        idx = ids.cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_vocab):
            bad = int(idx[(idx < 0) | (idx >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        raw = self._read_rows(idx)
        kernel = quant.quant_type(self.ggml_type).cpu_kernel
        if kernel is not None and hasattr(kernel, "dequantize_rows"):
            out = kernel.dequantize_rows(raw, self.ggml_type, self.n_embd)    # C++: ~50x faster
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = quant.dequantize(raw, self.ggml_type, (len(idx), self.n_embd))
        return out.to(self.device)
