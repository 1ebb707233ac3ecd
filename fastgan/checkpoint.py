"""Checkpoints: atomic writes, finding the newest readable one, RNG states, and loading a generator.

ckpt/iter_N.pt holds everything a resumed run needs (G, D, both optimizers, the GradScaler,
the iteration, every rank's RNG states, the config) in a form `torch.load(weights_only=True)`
accepts: no pickled numpy arrays or classes. generator.safetensors holds G's state_dict with
the config JSON in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastgan import config as config_mod
from fastgan.errors import UserError, WriteError, one_line
from fastgan.models import Generator

CKPT_NAME = re.compile(r"^iter_(\d+)\.pt$")
REQUIRED = ("iteration", "G", "D", "opt_g", "opt_d", "config")


class CheckpointError(UserError, RuntimeError):
    pass


# -- writing -----------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:       # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> Path:
    """`write(file_object)` into path.tmp, fsync, rename over path: a kill at any moment leaves
    either the old file or the new one, never half of one. A write that fails (full disk,
    read-only or vanished folder) removes path.tmp and raises WriteError naming path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:    # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e
    _fsync_dir(path.parent)
    return path


def _write_error(path: Path, e: Exception) -> WriteError:
    """WriteError(errno, reason, path); a RuntimeError from torch.save carries no errno, so the
    reason is looked up: no space, a read-only or a vanished folder."""
    if isinstance(e, OSError) and e.errno:
        return WriteError(e.errno, e.strerror, str(path))
    code = re.search(r"\bcode: (\d+)", str(e))       # safetensors: IoError(Os { code: 28, ... })
    if code:
        return WriteError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    folder = path.parent
    if not folder.is_dir():
        return WriteError(2, "its folder is gone", str(path))
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return WriteError(28, "No space left on device", str(path))
        if st.f_flag & os.ST_RDONLY:
            return WriteError(30, "Read-only file system", str(path))
    except OSError:
        pass
    return WriteError(5, one_line(str(e))[:200], str(path))


def save(state: dict, path: str | Path) -> Path:
    """A training checkpoint. A failed write leaves every earlier checkpoint as it was."""
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except WriteError as e:
        raise WriteError(e.errno, f"{e.strerror}; the checkpoints written before are intact: free space or "
                         "fix the folder, then run the same command to continue from the newest", e.filename) from e


def clean_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without torch.compile's `_orig_mod.` or DDP's `module.` prefixes, on the CPU."""
    out = {}
    for key, value in module.state_dict().items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value.detach().cpu().clone()
    return out


def save_generator(G: torch.nn.Module, cfg, path: str | Path) -> Path:
    """generator.safetensors: G's state_dict, the config JSON in the metadata."""
    tensors = {k: v.contiguous() for k, v in clean_state_dict(G).items()}
    meta = {"format": "fastgan-generator", "config": config_mod.dumps(cfg)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except Exception as e:     # safetensors raises its own error type for a failed write
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e
    _fsync_dir(path.parent)
    return path


# -- finding and reading -----------------------------------------------------------------------

def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every ckpt/iter_N.pt, newest first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_NAME.match(p.name))]
    return sorted(found, reverse=True)


def remove_temp_files(ckpt_dir: str | Path) -> list[Path]:
    """Leftovers of writes a kill interrupted."""
    folder = Path(ckpt_dir)
    leftovers = sorted(folder.glob("*.tmp")) if folder.is_dir() else []
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers


def prune(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` iter_N.pt (best.pt is not one of them)."""
    old = [p for _, p in list_checkpoints(ckpt_dir)[max(keep, 1):]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def load(path: str | Path) -> dict:
    """A training checkpoint, checked for the keys a resume needs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:       # truncated zip, bad pickle, empty file: all unreadable
        raise CheckpointError(unreadable(path, e)) from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a fastgan training checkpoint (missing: {', '.join(missing)})")
    return state


def unreadable(path: Path, e: Exception) -> str:
    """Why `path` does not load, in one line. Never torch's advice to retry with
    weights_only=False: that would run whatever code the file holds."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"cannot read checkpoint {path}: {err.strerror}"
    if size == 0:
        return f"cannot read checkpoint {path}: the file is empty (a write that never finished?)"
    if head != b"PK\x03\x04":
        return (f"cannot read checkpoint {path}: not a PyTorch checkpoint (those are zip archives; this "
                f"file starts with {head!r})")
    text = str(e)
    if "Weights only load failed" in text or "Unsupported global" in text:
        return (f"cannot read checkpoint {path}: it holds Python objects besides tensors and plain values, "
                "which fastgan does not load (only files written by fastgan, or a state_dict of tensors)")
    reason = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"cannot read checkpoint {path}: truncated or damaged ({reason.strip().split('. ')[0][:160]})"


def mismatch(model: torch.nn.Module, state: dict) -> str:
    """How a state_dict differs from a model's, in one line: missing and unexpected keys, and
    the first shapes that differ."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {list(state[k].shape)} vs {list(want[k].shape)}" for k in want
              if k in state and hasattr(state[k], "shape") and state[k].shape != want[k].shape]
    parts = []
    for name, items in (("shapes (file vs config)", shapes), ("missing", missing), ("unexpected", extra)):
        if items:
            more = f" and {len(items) - 2} more" if len(items) > 2 else ""
            parts.append(f"{name}: {', '.join(items[:2])}{more}")
    return "; ".join(parts) or "the keys and shapes match"


def load_latest(ckpt_dir: str | Path, warn=None) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads; unreadable newer ones (a kill mid-write on a filesystem
    without atomic rename, a full disk) are skipped with a warning."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for _, path in list_checkpoints(ckpt_dir):
        try:
            return path, load(path)
        except CheckpointError as e:
            warn(f"skipping {e}")
    return None


# -- RNG states --------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's global RNG states: torch CPU, CUDA, numpy, python."""
    key, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -- a generator from any fastgan file ---------------------------------------------------------

def _resolve_file(path: Path) -> Path:
    """A work_dir stands for its generator.safetensors, or else its newest checkpoint."""
    if path.is_dir():
        if (path / "generator.safetensors").is_file():
            return path / "generator.safetensors"
        found = list_checkpoints(path / "ckpt")
        if not found:
            raise CheckpointError(f"{path} holds neither generator.safetensors nor ckpt/iter_N.pt")
        return found[0][1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_generator_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(G's state_dict, the stored config dict or None) from .safetensors or .pt."""
    path = _resolve_file(Path(path))
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: not a safetensors file, or truncated "
                                  f"({one_line(str(e))[:160]})") from None
        return tensors, json.loads(meta["config"]) if "config" in meta else None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(unreadable(path, e)) from None
    if isinstance(state, dict) and "G" in state:
        return state["G"], state.get("config")
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state, None         # a bare G state_dict
    raise CheckpointError(f"{path} holds no generator (expected a fastgan checkpoint or a state_dict)")


def load_generator(path: str | Path, cfg=None, device: torch.device | str = "cpu",
                   backend: str = "torch") -> Generator:
    """G in eval mode from ckpt/iter_N.pt, generator.safetensors, a bare state_dict .pt, or a
    work_dir. `cfg` (a Config) gives the architecture; without it the file's stored config does."""
    tensors, stored = read_generator_file(path)
    if cfg is None:
        if stored is None:
            raise CheckpointError(f"{path} stores no config: pass one (CONFIG argument)")
        cfg = config_mod.from_dict(stored)
    m = cfg.model
    G = Generator(preset=m.preset, resolution=m.resolution, channels=m.channels,
                  base_channels=m.base_channels, backend=backend)
    try:
        G.load_state_dict(tensors)
    except RuntimeError:
        trained = f"; it was trained with {stored['model']}" if stored and "model" in stored else ""
        raise CheckpointError(f"{path} does not fit the configured model {m}{trained} (pass the config "
                              f"the run used, e.g. its work_dir/config.json): {mismatch(G, tensors)}") from None
    return G.to(device).eval()
