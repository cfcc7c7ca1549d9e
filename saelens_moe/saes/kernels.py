"""The package's compiled CPU kernels, built on first use, with eager PyTorch as the fallback.

The C++ sources next to this module (`top_k_rows.cpp`, `expert_matmuls.cpp`) are
compiled together with the system C++ compiler into one shared library in the user
cache (`$XDG_CACHE_HOME/saelens_moe`, else `~/.cache/saelens_moe`), keyed by the
sources, compiler, flags and machine, and loaded with ctypes. They run on PyTorch's
OpenMP thread pool. Without a compiler, when the build fails, or with
`SAELENS_MOE_KERNELS=0`, every caller runs its eager PyTorch path instead.
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

import torch

KERNEL_SWITCH = "SAELENS_MOE_KERNELS"
"""Environment variable; "0" makes everything run as eager PyTorch."""

_SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("top_k_rows.cpp", "expert_matmuls.cpp")
)
_COMPILE_FLAGS = (
    "-O3",
    "-ffp-contract=off",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fopenmp",
)
_BUILD_TIMEOUT_S = 300
_logger = logging.getLogger(__name__)


def kernel_enabled() -> bool:
    """False when `SAELENS_MOE_KERNELS=0` asks for eager PyTorch only."""
    return os.environ.get(KERNEL_SWITCH, "1") != "0"


def kernel_in_use() -> bool:
    """Whether the compiled kernels run here (building them if needed)."""
    return kernel_enabled() and compiled_library() is not None


def address(tensor: torch.Tensor | None) -> int | None:
    """The data pointer a kernel reads, of a contiguous tensor (None for null)."""
    if tensor is None:
        return None
    assert tensor.is_contiguous(), "the kernels read contiguous tensors only"
    return tensor.data_ptr()


def threads() -> int:
    return torch.get_num_threads()


@functools.cache
def compiled_library() -> ctypes.CDLL | None:
    """The loaded kernel library with its signatures declared, or None if it can't be built."""
    try:
        path = _built_library()
        library = None if path is None else ctypes.CDLL(str(path))
    except OSError as error:  # unreadable source, read-only cache, unloadable library
        _logger.warning(
            "the compiled kernels are unavailable (%s); using PyTorch", error
        )
        return None
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "top_k_positions": [pointer, size, size, size, pointer, size],
        "selected_expert_top_k": [pointer] * 8 + [size] * 4 + [pointer] * 2 + [size],
        "gathered_expert_matmuls": [
            pointer,  # sgemm
            pointer,  # sae_in
            size,  # d_in
            pointer,  # token_of_pair
            pointer,  # counts
            size,  # n_experts
            pointer,  # W_enc
            size,  # W_enc row stride
            size,  # block_size
            pointer,  # out
            size,  # threads
        ],
        "group_pairs": [pointer, size, size, pointer, pointer, pointer],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = size if name == "group_pairs" else None
    return library


def _built_library() -> Path | None:
    """The kernels' shared library from the cache, compiled first if missing."""
    found = compiler()
    if found is None:
        _logger.info("no C++ compiler found; the kernels' PyTorch fallbacks run")
        return None
    build = " ".join((platform.machine(), found, *_COMPILE_FLAGS))
    digest = hashlib.sha256(build.encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    library = cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [found, *_COMPILE_FLAGS, *map(str, _SOURCES), "-o", str(built)]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=False,
                timeout=_BUILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            _logger.warning("compiling the kernels timed out; using PyTorch")
            return None
        if result.returncode != 0:
            _logger.warning(
                "compiling the kernels failed; their PyTorch fallbacks run:\n%s",
                result.stderr,
            )
            return None
        built.replace(library)  # atomic: a concurrent build never sees half a file
    return library


def compiler() -> str | None:
    """The C++ compiler the kernels are built with: $CXX, else c++, g++ or clang++."""
    names = [os.environ["CXX"]] if "CXX" in os.environ else ["c++", "g++", "clang++"]
    found = (shutil.which(name) for name in names)
    return next((path for path in found if path is not None), None)


def cache_dir() -> Path:
    """Where built kernel libraries are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "saelens_moe"
