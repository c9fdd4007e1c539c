"""safetensors, read and written tensor by tensor: a file is written from `TensorPlan`s whose
values are computed only when their turn comes, read with an optional cast per tensor, and
nested training state (optimizer, RNG) is flattened to named tensors and back. Nothing here
ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor

# safetensors' names for torch dtypes (the format's header spells them this way).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class TensorPlan(NamedTuple):
    """One tensor of a safetensors file to be written: its shape and dtype are known up front
    (they fix the header), its values are computed only when its turn to be written comes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (a parameter or optimizer state sharded by FSDP2) is
    all-gathered, which is a collective every process must make in the same order; any other
    tensor is itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def planned(tensor: torch.Tensor) -> TensorPlan:
    """The plan of a tensor in memory; a sharded one is gathered when its turn comes (`whole`),
    so a file of sharded tensors is written one whole tensor at a time."""
    return TensorPlan(tuple(tensor.shape), tensor.dtype, lambda: whole(tensor))


def write_safetensors(handle: BinaryIO, plans: dict[str, TensorPlan]) -> None:
    """Write a safetensors file one tensor at a time, each computed only when it is written:
    a conversion (`palm_rlhf.hf`) never holds more than one converted tensor, where
    safetensors' save_file needs every tensor in memory at once. Layout, from the format's
    specification: an 8-byte little-endian header length, a JSON header (names -> dtype,
    shape, byte range; padded with spaces to a multiple of 8), then the raw little-endian
    bytes in header order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, plan in plans.items():
        if plan.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: cannot store dtype {plan.dtype} in safetensors")
        size = math.prod(plan.shape) * plan.dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[plan.dtype],
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    handle.write(struct.pack("<Q", len(text)))
    handle.write(text)
    for name, plan in plans.items():
        tensor = plan.produce().detach()
        if tuple(tensor.shape) != plan.shape or tensor.dtype != plan.dtype:
            raise ValueError(
                f"{name}: planned {plan.shape} {plan.dtype}, produced "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if sys.byteorder != "little" and tensor.dtype.itemsize > 1:
            raise NotImplementedError("writing safetensors on a big-endian machine")
        handle.write(memoryview(data.numpy()))


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, scalars) into tensors + a JSON skeleton.

    Optimizer and RNG states are nested Python objects holding tensors; torch.save would pickle
    them. Here the tensors go to safetensors and the structure to JSON, so loading never
    unpickles. Dict keys keep their type (optimizer state is keyed by int).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, list | tuple):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a checkpoint")

    return tensors, walk(obj, prefix or "state")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise ValueError(f"training state is missing tensor {key!r}")
            return tensors[key]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        raise ValueError(f"unrecognised training-state entry {sorted(skeleton)}")
    return skeleton


def load_safetensors(
    path: str | Path,
    dtype: torch.dtype | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a safetensors file, tensor by tensor, casting floating-point tensors to `dtype`
    as each is read (so an upcast never holds the file's copy and the cast one at once);
    anything else (a pickle, a torch.save zip) is refused unread. keep: read only the tensors
    whose names it accepts (the others are never read from disk)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = [name for name in handle.keys() if keep is None or keep(name)]  # noqa: SIM118
            return {name: cast(handle.get_tensor(name), dtype) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a valid safetensors file ({error}); refusing to load it "
            "(pickled checkpoints are never read)"
        ) from None


def stored_dtype(path: str | Path, names: Sequence[str]) -> str | None:
    """The dtype (torch's name) of the first of `names` a safetensors file holds, read from
    its header alone; None when it holds none of them."""
    with safe_open(str(path), framework="pt") as handle:
        held = set(handle.keys())
        for name in names:
            if name in held:
                kind = handle.get_slice(name).get_dtype()
                names_by_kind = {
                    v: str(k).removeprefix("torch.") for k, v in SAFETENSORS_DTYPES.items()
                }
                return names_by_kind.get(kind, kind.lower())
    return None


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point and a dtype is asked for, else itself."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of named tensors: BLAKE2b over each tensor's name, dtype, shape and bytes,
    in name order, so two checkpoints hold the same weights exactly when their digests agree
    (however the files were written). Reads every byte once: about as long as writing them.
    Sharded tensors are gathered one at a time: a collective then (`whole`)."""
    total = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        tensor = whole(tensors[name]).detach()
        total.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|"
                     .encode())  # fmt: skip
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        total.update(hashlib.blake2b(memoryview(data), digest_size=32).digest())
    return total.hexdigest()
