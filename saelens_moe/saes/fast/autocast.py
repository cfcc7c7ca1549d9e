"""Autocast queries that accept every device, including those without autocast.

`torch.is_autocast_enabled("meta")` and `torch.autocast("meta")` raise; here a
device type without autocast reads as autocast off, so the SAE runs on any device
(the meta device included, the test suite's stand-in for a GPU).
"""

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype if autocast is on for this device type, else None."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_disabled(device_type: str) -> AbstractContextManager[object]:
    """`torch.autocast(device_type, enabled=False)`, or nothing where there is none."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
