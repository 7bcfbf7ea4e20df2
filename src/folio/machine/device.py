"""Which device and dtype to run on, and the backend quirks that come with each.

Autodetect prefers cuda > mps > cpu. Only this module (and distributed.py) knows about
backend specifics such as MPS's top-k limit or which dtypes a device can autocast to.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import time

import torch

from folio.errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MPS_TOPK_LIMIT = 16  # torch.topk on MPS fails for k > 16
# glibc mallopt parameters (malloc.h) and the mmap threshold folio sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 1 << 30

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, for MFU.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
    "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
    "T4": 65e12,
}


def available_devices() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """'auto' -> the best available device; an unavailable one is a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    available = available_devices()
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"device={name} is not available here; available: "
                          f"{', '.join(available)} (or use --device=auto)")
    if device.type == "mps" and "mps" not in available:
        raise DeviceError(f"device=mps is not available here; available: {', '.join(available)}")
    return device


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX-512 BF16 or AMX)."""
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def dtype_name(dtype: torch.dtype) -> str:
    """The settings' name of a torch dtype: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """'auto' picks the fastest dtype that trains reliably on `device`.

    On a CPU that is float32: whether bfloat16 pays depends on the model (a 2048^2 matmul
    said yes where the char model's casts made its steps 1.4x slower), so training measures
    it on the model's own steps (speed/training.py) and replaces this answer.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPES.get(name)
    if dtype is None:
        raise DeviceError(f"dtype={name!r} is unknown; use auto, float32, bfloat16 or float16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"dtype=bfloat16 is not supported on {device}; use float16 or float32")
    if dtype == torch.float16 and device.type == "cpu" and training:  # sampling works
        raise DeviceError("dtype=float16 is not supported for training on the CPU; "
                          "use bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_threads(processes_on_machine: int = 1) -> int:
    """Give this process its share of the cores (oversubscribed OpenMP is ~10x slower)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, physical_cores() // max(1, processes_on_machine))
    torch.set_num_threads(threads)
    return threads


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (they share the FMA units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if not cpus:
        return os.cpu_count() or 1
    siblings = set()
    for cpu in cpus:
        try:
            path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            with open(path) as f:
                siblings.add(f.read().strip())
        except OSError:
            siblings.add(str(cpu))
    return max(1, len(siblings))


def flush_denormals() -> bool:
    """Treat denormal floats as zero on this CPU (x86 FTZ/DAZ): returns whether it took.

    Early in training some values (probably Adam's second moments of rarely-hit rows, such as
    a small vocabulary's padding rows) pass through the denormal range, where x86 float math
    is 10-100x slower: without this, the first ~100 steps of nanoGPT's README CPU model
    took 1.4 s each instead of 0.13 s here. Values below 1.2e-38 change; nothing else does.
    """
    return torch.set_flush_denormal(True)


def configure_allocator() -> bool:
    """Keep freed memory in the process (glibc): returns whether the settings took.

    Above glibc's mmap threshold every buffer is a fresh mmap, page-faulted on first touch and
    unmapped on free, so each training step pays the kernel to zero its activations again
    (more than half of a step for nanoGPT's BPE shape on a CPU). Raising the threshold and
    never trimming the heap lets later steps reuse the same memory. Call once at startup.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, -1))  # -1: never give the heap back
    except (OSError, AttributeError):  # not glibc (musl, ...): keep its defaults
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk that also works for k > 16 on MPS (by running that case on the CPU)."""
    if logits.device.type == "mps" and k > MPS_TOPK_LIMIT:
        values, indices = torch.topk(logits.cpu(), k)
        return values.to(logits.device), indices.to(logits.device)
    return torch.topk(logits, k)


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the configured figure, a GPU table entry, or a measured CPU matmul."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2
        return 0.0
    if device.type == "cpu":
        return measured_cpu_matmul_flops(dtype)
    return 0.0


@functools.cache
def measured_cpu_matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """`cpu_matmul_flops`, measured once per process (start-up choices, MFU)."""
    return cpu_matmul_flops(dtype, n, repeats)


def cpu_matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on this CPU in `dtype` (~0.2 s in fp32)."""
    g = torch.Generator().manual_seed(0)  # never touch the global RNG: resume must be exact
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
