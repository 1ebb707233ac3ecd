"""Checkpoints: writing them (whole or not at all: fastgan/files.py), finding the newest readable
one, RNG states, and loading a generator or discriminator from any file fastgan knows (its own,
MMGeneration's, MMagic's: fastgan/convert.py).

ckpt/iter_N.pt holds everything a resumed run needs (G, D, both optimizers, the GradScaler,
the iteration, every rank's RNG states, the config) in a form `torch.load(weights_only=True)`
accepts: no pickled numpy arrays or classes. generator.safetensors holds G's state_dict with
the config JSON in its metadata (with the EMA generator's weights when EMA is on).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastgan import config as config_mod
from fastgan import convert, files
from fastgan.convert import CheckpointError, clean_state_dict
from fastgan.errors import WriteError, first_line
from fastgan.models import Discriminator, Generator, model_kwargs

REQUIRED = ("iteration", "G", "D", "opt_g", "opt_d", "config")


# -- writing -----------------------------------------------------------------------------------

def save(state: dict, path: str | Path) -> Path:
    """A training checkpoint. A failed write leaves every earlier checkpoint as it was."""
    # On the host first: a device error while copying (the optimizer moments live on the GPU) is
    # then its own error, and a RuntimeError from torch.save can only be its file writer's.
    state = to_cpu(state)
    try:
        return files.atomic_write(path, lambda f: torch.save(state, f), failures=(RuntimeError,))
    except WriteError as e:
        raise WriteError(e.errno, f"{e.strerror}; the checkpoints written before are intact: free space or "
                         "fix the folder, then run the same command to continue from the newest", e.filename) from e


def to_cpu(obj):
    """`obj` with every tensor in it (nested in dicts, lists and tuples) on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_generator(G: torch.nn.Module, cfg, path: str | Path, ema: bool = False) -> Path:
    """generator.safetensors: G's state_dict, the config JSON in the metadata; `ema` marks the
    EMA generator's weights (the file then holds no raw G)."""
    tensors = {k: v.contiguous() for k, v in clean_state_dict(G).items()}
    meta = {"format": "fastgan-generator", "config": config_mod.dumps(cfg), "generator": "ema" if ema else "raw"}
    with files.atomic(path, failures=(SafetensorError,)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


# -- finding and reading -----------------------------------------------------------------------

def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every ckpt/iter_N.pt, newest first."""
    return files.numbered(ckpt_dir, ".pt")[::-1]


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
    state = convert.torch_load(path)     # truncated zip, bad pickle, empty file: CheckpointError
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        hint = (": it is an MMGeneration/MMagic checkpoint; start a new run from its weights with "
                f"--init_from={path}") if convert.is_mmgen(state) else f" (missing: {', '.join(missing)})"
        raise CheckpointError(f"{path} is not a fastgan training checkpoint{hint}")
    for key in ("G", "D", "G_ema"):     # names from before they became MMGeneration's
        if isinstance(state.get(key), dict):
            state[key] = convert.upgrade_keys(state[key])
    return state


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


# -- a generator or discriminator from any checkpoint --------------------------------------------

def _resolve_file(path: Path, raw: bool = False, need_d: bool = False) -> Path:
    """A work_dir stands for its generator.safetensors, or else (or for the raw G of an EMA run,
    or when D is wanted: the safetensors holds none) its newest checkpoint."""
    if path.is_dir():
        st = path / "generator.safetensors"
        found = list_checkpoints(path / "ckpt")
        if st.is_file() and not need_d and not (raw and found and _safetensors_meta(st).get("generator") == "ema"):
            return st
        if not found:
            raise CheckpointError(f"{path} holds no ckpt/iter_N.pt (generator.safetensors holds no discriminator)"
                                  if need_d else f"{path} holds neither generator.safetensors nor ckpt/iter_N.pt")
        return found[0][1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _safetensors_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def read_weights(path: str | Path, raw: bool = False, need_d: bool = False) -> tuple[Path, convert.Weights]:
    """(the file, what it holds in fastgan's names and RGB): ckpt/iter_N.pt, generator.safetensors,
    a work_dir, a bare G or D state_dict, or an MMGeneration/MMagic checkpoint. need_d: a work_dir
    stands for its newest checkpoint."""
    path = _resolve_file(Path(path), raw, need_d)
    if path.suffix != ".safetensors":
        return path, convert.read_torch(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: not a safetensors file, or truncated "
                              f"({first_line(e, 160)})") from None
    ema = meta.get("generator") == "ema"
    w = convert.Weights(source="generator.safetensors", config=json.loads(meta["config"]) if "config" in meta else None,
                        ema_only=ema)
    w.G = convert.upgrade_keys(tensors)
    return path, w


def _generator_weights(path: Path, w: convert.Weights, raw: bool) -> tuple[dict, str]:
    """(G's state_dict, which one it is) -- the EMA generator when the file has one, unless raw."""
    if w.G_ema is not None and not raw:
        return w.G_ema, "the EMA generator (--raw: the trained one)"
    if w.ema_only:
        if raw:
            raise CheckpointError(f"{path} holds only the EMA generator; for the raw one pass a checkpoint "
                                  "(work_dir/ckpt/iter_N.pt) or the work_dir")
        return w.G, "the EMA generator"
    if w.G is None:
        raise CheckpointError(f"{path} holds no generator ({w.source})")
    return w.G, "the raw generator" if w.G_ema is not None else "the generator"


def read_generator_file(path: str | Path, raw: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(G's state_dict, the stored config dict or None) from any file read_weights reads."""
    path, w = read_weights(path, raw)
    return _generator_weights(path, w, raw)[0], w.config


def _config_for(path, cfg, stored: dict | None):
    if cfg is not None:
        return cfg
    if stored is None:
        raise CheckpointError(f"{path} stores no config: pass one (CONFIG argument)")
    return config_mod.from_dict(stored)


def load_generator(path: str | Path, cfg=None, device: torch.device | str = "cpu",
                   backend: str = "torch", raw: bool = False, log=None) -> Generator:
    """G in eval mode from ckpt/iter_N.pt, generator.safetensors, a bare state_dict .pt, a work_dir,
    or an MMGeneration/MMagic checkpoint (converted to RGB). The EMA generator when the file has
    one, the trained G with raw=True. `cfg` (a Config) gives the architecture; without it the file's
    stored config does. `log(message)` hears about conversions and which generator was loaded."""
    path, w = read_weights(path, raw)
    sd, which = _generator_weights(path, w, raw)
    G = Generator(**model_kwargs(_config_for(path, cfg, w.config).model, backend))
    convert.load_into(G, sd, path, "G")
    if log:
        for note in w.notes:
            log(note)
        log(f"{path}: {which}")
    return G.to(device).eval()


def load_discriminator(path: str | Path, cfg=None, device: torch.device | str = "cpu",
                       backend: str = "torch", log=None) -> Discriminator:
    """D in eval mode, from the same files as load_generator (generator.safetensors holds none: a
    work_dir stands for its newest checkpoint)."""
    path, w = read_weights(path, need_d=True)
    if w.D is None:
        raise CheckpointError(f"{path} holds no discriminator ({w.source}); pass a checkpoint that has one")
    D = Discriminator(**model_kwargs(_config_for(path, cfg, w.config).model, backend))
    convert.load_into(D, w.D, path, "D")
    if log:
        for note in w.notes:
            log(note)
    return D.to(device).eval()


def init_networks(path: str | Path, G: torch.nn.Module, D: torch.nn.Module, log=None) -> str:
    """Load a checkpoint's trained G and D (not its EMA) into G and D, in place: the start of a new
    run (train.py's init_from). Returns what the file was."""
    path, w = read_weights(path, raw=True, need_d=True)
    if w.G is None or w.D is None or w.ema_only:
        raise CheckpointError(f"{path} does not hold both a generator and a discriminator ({w.source}); "
                              "init_from needs a training checkpoint")
    convert.load_into(G, w.G, path, "G")
    convert.load_into(D, w.D, path, "D")
    if log:
        for note in w.notes:
            log(note)
    return w.source
