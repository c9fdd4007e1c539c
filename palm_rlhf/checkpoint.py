"""Checkpoint directories: JSON configs + safetensors weights, written atomically.

Nothing here ever unpickles: weights are read with safetensors, configs with json. A directory
is written in full under a temporary name beside the target and then swapped into place (one
atomic exchange on Linux, see `replace_dir_atomic`), so an interrupted save never leaves a
half-written checkpoint, or no checkpoint, where a good one was.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

WEIGHTS_NAME = "model.safetensors"
M = TypeVar("M", bound=nn.Module)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_stream_atomic(path: str | Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write a file through `fill(handle)` into a temporary sibling, fsync, then rename: readers
    see the old file or the new one, never half of one (streamed, so a large file need not fit
    in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`write_stream_atomic` for bytes already in memory."""
    write_stream_atomic(path, lambda handle: handle.write(data))


def replace_dir_atomic(
    directory: str | Path, fill: Callable[[Path], None], owned_names: Iterable[str]
) -> None:
    """Build a directory with `fill(tmp_dir)` and swap it in place of `directory`.

    An existing directory is only replaced if every file in it is one this kind of checkpoint
    writes (`owned_names`); anything else in it is the user's, and we refuse rather than lose it.

    The new directory is built in full beside the target, as `.{name}.tmp-*`, and fsynced. An
    existing target is then exchanged with it in one `renameat2(RENAME_EXCHANGE)` call, so at
    every instant `directory` is the complete old checkpoint or the complete new one; the old
    one, now under the temporary name, is deleted afterwards. Where the exchange is unavailable
    (not Linux, glibc before 2.28, a filesystem that refuses it) the old directory is renamed
    away to `.{name}.old-*` and the new one renamed into place: that fallback leaves a moment
    with nothing at `directory`, though never a partial checkpoint.

    A process killed mid-save can leave a `.{name}.tmp-*` (a partial new directory, or the old
    one after the exchange) or `.{name}.old-*` sibling. They are left for the user to delete:
    their hidden names keep them out of every lookup (`from_pretrained` reads only `directory`,
    checkpoint rotation globs `step_*`), and without a lock a stale leftover cannot be told
    apart from the directory another live process is saving right now.
    """
    directory = Path(directory)
    _check_overwritable(directory, set(owned_names))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        fill(tmp)
        _fsync_files_and_dir(tmp)
        _swap_into_place(tmp, directory)
    except BaseException:
        # Before the swap tmp is the partial new directory; after an exchange it is the old one.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_overwritable(directory: Path, owned: set[str]) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in owned)
    if foreign:
        raise ValueError(
            f"{directory}: refusing to overwrite a directory holding other files {foreign}; "
            "save to an empty or new directory"
        )


def _swap_into_place(tmp: Path, directory: Path) -> None:
    """Move the finished `tmp` to `directory`, replacing whatever checkpoint is there."""
    if not directory.exists():
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    elif exchange_paths(tmp, directory):
        # Make the new entry durable before deleting the only other copy of the old checkpoint.
        _fsync_dir(directory.parent)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(old, directory)  # put the old checkpoint back rather than leave nothing
            raise
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)


# From <linux/fs.h> and <fcntl.h>: swap the two names; paths are relative to the working dir.
RENAME_EXCHANGE = 2
AT_FDCWD = -100
# How renameat2 says "not here": a kernel before 3.15 or a libc stub (ENOSYS), a filesystem
# without exchange support (EINVAL; EOPNOTSUPP from some FUSE and network filesystems).
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (2.28+), or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    path, fd = ctypes.c_char_p, ctypes.c_int
    function.argtypes = [fd, path, fd, path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(first: str | Path, second: str | Path) -> bool:
    """Atomically swap the two existing paths, so each name now holds what the other held.

    Returns False, having changed nothing, where the system cannot exchange (see
    `_EXCHANGE_UNSUPPORTED`); any other failure (a missing path, no permission) raises OSError.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    first_bytes, second_bytes = os.fsencode(first), os.fsencode(second)
    if renameat2(AT_FDCWD, first_bytes, AT_FDCWD, second_bytes, RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    # OSError picks the subclass from the code (FileNotFoundError, PermissionError, ...).
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _fsync_files_and_dir(path: Path) -> None:
    """fsync every file directly in `path` (checkpoints are flat), then `path` itself."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """fsync a directory's entries (the names in it), not the files they point to."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def planned(tensor: torch.Tensor) -> TensorPlan:
    """The plan of a tensor already in memory."""
    return TensorPlan(tuple(tensor.shape), tensor.dtype, lambda: tensor)


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


def save_model_dir(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    json_files: dict[str, Any],
    extra_tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write `json_files` (name -> JSON-able object, or a str written as it is; None skips
    it), the weights as model.safetensors and any `extra_tensor_files` (name -> tensors), all
    in one atomic swap."""
    tensor_files = {WEIGHTS_NAME: state_dict, **(extra_tensor_files or {})}
    plans = {
        name: {key: planned(t) for key, t in tensors.items()}
        for name, tensors in tensor_files.items()
    }
    save_planned_dir(directory, plans, json_files)


def save_planned_dir(
    directory: str | Path,
    tensor_files: dict[str, dict[str, TensorPlan]],
    files: dict[str, Any],
    owned_names: Iterable[str] = (),
) -> None:
    """`save_model_dir` for tensors that are computed as they are written (`TensorPlan`);
    `owned_names` are more names an existing `directory` may hold and still be replaced."""

    def fill(tmp: Path) -> None:
        for name, obj in files.items():
            if isinstance(obj, str):
                (tmp / name).write_text(obj, encoding="utf-8")
            elif obj is not None:
                (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        for name, plans in tensor_files.items():
            with open(tmp / name, "wb") as handle:
                write_safetensors(handle, plans)

    replace_dir_atomic(directory, fill, [*files, *tensor_files, *owned_names])


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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def load_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, tensor by tensor, casting floating-point tensors to `dtype`
    as each is read (so an upcast never holds the file's copy and the cast one at once);
    anything else (a pickle, a torch.save zip) is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: cast(handle.get_tensor(name), dtype) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a valid safetensors file ({error}); refusing to load it "
            "(pickled checkpoints are never read)"
        ) from None


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point and a dtype is asked for, else itself."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: Path, assign: bool = False
) -> None:
    """load_state_dict with an error that lists every missing, unexpected or misshapen tensor.
    assign=True adopts the given tensors (and their dtype) instead of copying into the
    model's: the way to fill a model built on the meta device."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(set(expected) & set(state)):
        if expected[name].shape != state[name].shape:
            problems.append(
                f"{name}: shape {tuple(state[name].shape)} in the file, "
                f"{tuple(expected[name].shape)} in the model"
            )
    if problems:
        raise ValueError(f"{source}: weights do not match the config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)


def latest_pointer(root: Path) -> Path | None:
    """The checkpoint directory that `root/latest.json` names (as `TrainingCheckpoints` writes
    it), or None when there is no pointer."""
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    data = read_json(pointer)
    name = data.get("dir") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{pointer}: 'dir' must name a checkpoint directory, got {name!r}")
    return root / name


def resolve_run_dir(directory: Path) -> Path:
    """A training run's directory (holding checkpoints/latest.json, as the training loops write
    it) stands for its latest checkpoint, so `from_pretrained("runs/tiny")` works; any other
    path comes back unchanged."""
    if (directory / "config.json").is_file():
        return directory
    return latest_pointer(directory / "checkpoints") or directory


def load_model_dir(
    directory: str | Path,
    build: Callable[[dict[str, Any]], M],
    json_names: Iterable[str],
    dtype: torch.dtype | None = None,
    text_names: Iterable[str] = (),
) -> M:
    """Read the JSON files (the first is required) and the text files that are there, `build`
    the model from them (JSON parsed, text as str, None where absent), load weights. A run
    directory stands for its latest checkpoint (`resolve_run_dir`).

    The model is built on the meta device (no memory, no initialisation) and takes the file's
    tensors as its own (assign=True): loading holds one copy of the weights, in the file's
    dtype, or in `dtype` when one is given (cast tensor by tensor). Non-persistent buffers,
    which no file holds, are rebuilt by each module's `rebuild_buffers()`.
    """
    directory = resolve_run_dir(Path(directory))
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    names = list(json_names)
    files: dict[str, Any] = {}
    for name in names:
        path = directory / name
        files[name] = read_json(path) if path.is_file() else None
    if files[names[0]] is None:
        raise FileNotFoundError(f"{directory / names[0]}: missing")
    for name in text_names:
        path = directory / name
        files[name] = path.read_text(encoding="utf-8") if path.is_file() else None
    try:
        with torch.device("meta"):
            model = build(files)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory}: bad config: {error}") from None
    weights = directory / WEIGHTS_NAME
    load_state_strict(model, load_safetensors(weights, dtype), weights, assign=True)
    for module in model.modules():
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers()
    still_meta = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
    ]
    if still_meta:
        raise RuntimeError(f"{directory}: tensors left unloaded after loading: {still_meta}")
    return model
