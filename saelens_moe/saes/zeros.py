"""Large zero-filled CPU tensors, zeroed by the operating system instead of by a fill.

`torch.zeros` writes every byte itself, and each 4 KiB page of a fresh allocation
costs a page fault on first touch. A calloc this large is a fresh mapping the
kernel has already zeroed, and NumPy advises transparent huge pages on it, so the
first write costs one fault per 2 MiB instead of per 4 KiB. Dense encoder outputs
and weight gradients are written once per call, so they pay that cost every time.
"""

import math

import numpy as np
import torch

MIN_OS_ZEROED_BYTES = 1 << 25
"""Below this, glibc may serve calloc from reused memory and fill it anyway."""


def big_zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """`like.new_zeros(shape)`, with memory the OS zeroed when it is large and on CPU."""
    n_bytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or n_bytes < MIN_OS_ZEROED_BYTES:
        return like.new_zeros(shape)
    # all-zero bytes are 0 in every dtype, so any dtype can view them
    zeroed_bytes = torch.from_numpy(np.zeros(n_bytes, dtype=np.uint8))
    return zeroed_bytes.view(like.dtype).view(shape)
