"""Integrity of saved weights: a SHA-256 of the tensors, stored beside them and checked on load.

A damaged or edited checkpoint can still unpickle and even fit the architecture; the digest
catches it. It covers each tensor's name, dtype, shape and bytes, in name order, so it does not
depend on how the file was written (``torch.save`` adds its own framing).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["state_digest", "check_digest"]


def state_digest(state_dict: dict) -> str:
    """SHA-256 (hex) of a state_dict's tensors: names, dtypes, shapes and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(state_dict[name].shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_digest(path, checkpoint: dict) -> None:
    """Raise ValueError (one line, naming ``path``) unless ``checkpoint["sha256"]`` is the digest
    of ``checkpoint["state_dict"]``."""
    recorded = checkpoint.get("sha256")
    if not recorded:
        raise ValueError(f"{path}: no SHA-256 of the weights recorded (written by an older "
                         f"unimo-bids?)")
    if state_digest(checkpoint["state_dict"]) != recorded:
        raise ValueError(f"{path}: the weights do not match their recorded SHA-256 (the file is "
                         f"damaged or was edited)")
