"""Row-wise Top-K, as a small compiled CPU kernel with `torch.topk` as the fallback.

`torch.topk` partitions (value, index) pairs of every row with a branchy
comparator; for 4096 rows of 768 candidates and k = 32 that took 11-12 ms on two
cores, more than half as long as the selected experts' matmuls. The kernel in `top_k_rows.cpp` bounds each row's
k-th value by its smallest group maximum and selects only among the entries
above it. `compiled_expert_top_k` also builds each token's candidates on the fly
from the grouped matmul outputs (Feature Scaling, bias, decoder norm, weight,
ReLU), so no [tokens, e * m] candidate tensor is written or re-read.

The kernel is compiled on first use with the system C++ compiler into the user
cache (`$XDG_CACHE_HOME/saelens_moe`, else `~/.cache/saelens_moe`) and runs on
PyTorch's OpenMP thread pool. Without a compiler, when the build fails, for
tensors it does not handle (not CPU float32), or with `SAELENS_MOE_KERNELS=0`,
PyTorch runs instead. Both choose the same values; only which of several equal
values is kept may differ.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import record_function

KERNEL_SWITCH = "SAELENS_MOE_KERNELS"
"""Environment variable; "0" makes every Top-K use `torch.topk`."""

_SOURCE = Path(__file__).with_name("top_k_rows.cpp")
_COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
_MAX_COLUMNS = 1 << 32  # the kernel packs a position into 32 bits
_logger = logging.getLogger(__name__)


def top_k_positions(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of each row (NaN largest), in no order. [rows, k]"""
    library = _compiled_library() if _kernel_handles(candidates, k) else None
    if library is None:
        return candidates.topk(k, dim=-1, sorted=False).indices
    matrix = candidates.contiguous()
    n_rows, n_cols = matrix.shape
    positions = torch.empty(n_rows, k, dtype=torch.long)
    with record_function("saelens_moe::top_k_positions"):  # visible in profiles
        library.top_k_positions(
            _address(matrix), n_rows, n_cols, k, _address(positions), _threads()
        )
    return positions


class ExpertEpilogue(NamedTuple):
    """What turns the selected experts' matmul outputs into weighted ReLU candidates.

    Fields in the order `selected_expert_top_k` in the kernel takes them.
    """

    scale: torch.Tensor | None
    """Feature Scaling's (1 + omega) per (token, slot), or None. [tokens, e]"""
    shift: torch.Tensor | None
    """Feature Scaling's omega (a . x) per (token, slot), or None. [tokens, e]"""
    weights: torch.Tensor
    """Expert weights, all >= 0. [tokens, e]"""
    bias: torch.Tensor
    """b_enc. [d_sae]"""
    norms: torch.Tensor | None
    """Decoder row norms to multiply by, or None. [d_sae]"""


def compiled_expert_top_k(
    grouped_pre: torch.Tensor,  # [pairs, m], rows grouped by expert
    grouped_row: torch.Tensor,  # [tokens, e], row of each (token, slot)
    experts: torch.Tensor,  # [tokens, e]
    epilogue: ExpertEpilogue,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, global latents) of each token's top k candidates, or None without the kernel.

    The candidate of latent j of slot s is grouped_pre[grouped_row[t, s], j] through
    the epilogue, in the order `experts._weighted_candidates` applies it; each
    [tokens, k].
    """
    n_tokens, n_active = experts.shape
    block_size = grouped_pre.shape[1]
    floats = [grouped_pre, epilogue.weights, epilogue.bias]
    optional = [epilogue.scale, epilogue.shift, epilogue.norms]
    floats += [tensor for tensor in optional if tensor is not None]
    handled = kernel_enabled() and all(
        tensor.device.type == "cpu" and tensor.dtype == torch.float32
        for tensor in floats
    )
    n_candidates = n_active * block_size
    fits = 0 < k <= n_candidates < _MAX_COLUMNS
    library = _compiled_library() if handled and fits else None
    if library is None:
        return None
    values = torch.empty(n_tokens, k, dtype=torch.float32)
    latents = torch.empty(n_tokens, k, dtype=torch.long)
    # contiguous copies are bound here, so they outlive the call that reads them
    inputs = [
        None if tensor is None else tensor.contiguous()
        for tensor in (grouped_pre, grouped_row, experts, *epilogue)
    ]
    with record_function("saelens_moe::selected_expert_top_k"):  # visible in profiles
        library.selected_expert_top_k(
            *(_address(tensor) for tensor in inputs),
            n_tokens,
            n_active,
            block_size,
            k,
            _address(values),
            _address(latents),
            _threads(),
        )
    return values, latents


def kernel_enabled() -> bool:
    """False when `SAELENS_MOE_KERNELS=0` asks for eager PyTorch only."""
    return os.environ.get(KERNEL_SWITCH, "1") != "0"


def kernel_in_use() -> bool:
    """Whether float32 CPU Top-Ks run as the compiled kernel here (building it if needed)."""
    return kernel_enabled() and _compiled_library() is not None


def _kernel_handles(candidates: torch.Tensor, k: int) -> bool:
    return (
        kernel_enabled()
        and candidates.device.type == "cpu"
        and candidates.dtype == torch.float32
        and candidates.dim() == 2
        and 0 < k <= candidates.shape[1] < _MAX_COLUMNS
    )


def _address(tensor: torch.Tensor | None) -> int | None:
    """The data pointer the kernel reads, of a contiguous tensor (None for null)."""
    if tensor is None:
        return None
    assert tensor.is_contiguous(), "the Top-K kernel reads contiguous tensors only"
    return tensor.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


@functools.cache
def _compiled_library() -> ctypes.CDLL | None:
    try:
        path = _built_library()
        library = None if path is None else ctypes.CDLL(str(path))
    except OSError as error:  # unreadable source, read-only cache, unloadable library
        _logger.warning("the Top-K kernel is unavailable (%s); using torch.topk", error)
        return None
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.top_k_positions.argtypes = [pointer, size, size, size, pointer, size]
    library.top_k_positions.restype = None
    library.selected_expert_top_k.argtypes = (
        [pointer] * 8 + [size] * 4 + [pointer] * 2 + [size]
    )
    library.selected_expert_top_k.restype = None
    return library


def _built_library() -> Path | None:
    """The kernel's shared library from the cache, compiled first if missing."""
    compiler = _compiler()
    if compiler is None:
        _logger.info("no C++ compiler found; Top-K runs as torch.topk")
        return None
    build = " ".join((platform.machine(), compiler, *_COMPILE_FLAGS))
    key = hashlib.sha256(_SOURCE.read_bytes() + build.encode()).hexdigest()[:16]
    library = _cache_dir() / f"top_k_rows-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *_COMPILE_FLAGS, str(_SOURCE), "-o", str(built)]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=300
            )
        except subprocess.TimeoutExpired:
            _logger.warning("compiling the Top-K kernel timed out; using torch.topk")
            return None
        if result.returncode != 0:
            _logger.warning(
                "compiling the Top-K kernel failed; Top-K runs as torch.topk:\n%s",
                result.stderr,
            )
            return None
        built.replace(library)  # atomic: a concurrent build never sees half a file
    return library


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if "CXX" in os.environ else ["c++", "g++", "clang++"]
    found = (shutil.which(name) for name in names)
    return next((path for path in found if path is not None), None)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "saelens_moe"
