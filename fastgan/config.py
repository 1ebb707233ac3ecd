"""Typed configuration: dataclasses, Python config files, `--key=value` overrides.

A config file is a Python file that defines a module-level `config` (a `Config`). It may
start from another file with `load(path)` and `dataclasses.replace`/`override`.

    cfg = load("configs/quickstart.py", ["--total_iters=500", "--model.base_channels=64"])

Every value is checked against its field's type and, where a field lists `choices`, against
those; an unknown key or a bad value raises ConfigError naming what is valid. A set of choices is
defined where it gets its meaning and imported here: presets, resolutions, channels and backends
in models.py, recipes and amp dtypes in step.py, the data recipes in data/transforms.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import runpy
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastgan import files
from fastgan.data.transforms import RECIPES as DATA_RECIPES
from fastgan.errors import UserError
from fastgan.models import BACKEND_CHOICES, CHANNELS, PRESETS, RESOLUTIONS
from fastgan.step import AMP_DTYPES, RECIPES


class ConfigError(UserError, ValueError):
    pass


def _choice(default, choices, help=""):
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def _opt(default, help=""):
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    preset: str = _choice("mmgen", PRESETS, "architecture, init and activations")
    resolution: int = _choice(64, RESOLUTIONS, "image side in pixels")
    channels: int = _choice(3, CHANNELS, "image channels (1: grayscale, 3: RGB)")
    base_channels: Optional[int] = _opt(None, "width at full resolution (G's last hidden, D's first); None: the preset's")


@dataclass
class DataConfig:
    source: str = _choice("folder", ("folder", "idx", "synthetic"), "where images come from")
    root: str = _opt("data/celeba/img_align_celeba", "image folder, idx file, or where synthetic images are written")
    recipe: str = _choice("resize", DATA_RECIPES,
                          "resize: squash to size, aspect ignored (MMGen); center_crop: central square, then resize")
    crop_size: Optional[int] = _opt(None, "center_crop: side of the central square; None: the shorter side")
    flip: bool = _opt(False, "random horizontal flip")
    loader: str = _choice("auto", ("auto", "dali", "torch"), "auto: DALI when installed")
    cache: str = _choice("gpu", ("gpu", "host", "off"), "where the decoded dataset lives")
    cache_dir: str = _opt("~/.cache/fastgan", "decoded-dataset cache on disk")
    num_workers: int = _opt(2, "torch loader worker processes")
    synthetic_count: int = _opt(4096, "synthetic source: number of images generated")


@dataclass
class OptimConfig:
    lr_g: float = _opt(2e-4)
    lr_d: float = _opt(2e-4)
    beta1: float = _opt(0.5)
    beta2: float = _opt(0.999)


@dataclass
class EvalConfig:
    metrics: str = _opt("swd,ms_ssim", "comma-separated: swd, ms_ssim, fid, kid, is")
    num_samples: int = _opt(10000, "generated images per evaluation")
    best_metric: str = _opt("swd", "checkpoint kept as best by this metric ('' for none)")
    inception_weights: Optional[str] = _opt(None, "pt_inception-2015-12-05-6726825d.pth; env FASTGAN_INCEPTION too")


@dataclass
class EMAConfig:
    enabled: bool = _opt(False, "keep an exponential moving average of G's weights; sample grids, evaluation, "
                                "generator.safetensors, sample.py and evaluate.py then use it")
    half_life_kimg: float = _opt(10.0, "half-life of the average in thousands of images (StyleGAN2-ADA's ema_kimg)")
    rampup: Optional[float] = _opt(0.05, "half-life at most rampup x the images seen so far (StyleGAN2-ADA's "
                                         "ema_rampup); none: no ramp-up")
    start_iter: int = _opt(0, "until this iteration the average is a copy of G")


@dataclass
class Config:
    work_dir: str = _opt("work_dirs/run", "outputs: samples, checkpoints, logs")
    total_iters: int = _opt(300000)
    batch_size: int = _opt(128, "per process")
    seed: int = _opt(0)
    amp: str = _choice("fp32", AMP_DTYPES, "autocast dtype (fp16 adds a GradScaler)")
    compile: bool = _opt(False, "torch.compile the training step")
    backend: str = _choice("auto", BACKEND_CHOICES, "auto: triton on CUDA, torch elsewhere")
    recipe: str = _choice("mmgen", RECIPES,
                          "iteration order: mmgen draws z twice and runs D on fake then real; "
                          "pytorch_examples reuses one fake batch and runs D on real first")
    deterministic: bool = _opt(False, "fused kernels reduce BN statistics without atomics")
    cuda_graph: bool = _opt(True, "capture the whole iteration in a CUDA graph (CUDA, triton backend)")
    sample_interval: int = _opt(10000)
    num_samples: int = _opt(16, "images in each training sample grid")
    ckpt_interval: int = _opt(10000)
    keep_ckpts: int = _opt(20, "newest checkpoints kept")
    ckpt_minutes: float = _opt(10.0, "also checkpoint when this many minutes passed since the last one (0: off)")
    log_interval: int = _opt(100)
    eval_interval: int = _opt(0, "0: no evaluation during training")
    init_from: Optional[str] = _opt(None, "start a new run from this checkpoint's G and D (fastgan, MMGeneration or "
                                          "MMagic; fresh optimizers, iteration 0); a work_dir with checkpoints resumes")
    dist_timeout_s: float = _opt(600.0, "several processes: a rank stuck or gone this long stops the run")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


# ---------------------------------------------------------------------------------------------
# keys, types, values

def _fields(obj) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def keys(cfg: Config | None = None, prefix: str = "") -> list[str]:
    """All dotted keys, nested ones included."""
    cfg = cfg or Config()
    out = []
    for name, f in _fields(cfg).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            out += keys(value, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return f"{_type_name(args[0])} or none"
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check (and, for strings from the command line, parse) one value."""
    tp = f.type
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        try:
            if tp is bool:
                low = text.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("true", "1", "yes", "on")
            elif tp is int:
                value = int(text)
            elif tp is float:
                value = float(text)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a {_type_name(f.type)}") from None
    ok = (isinstance(value, tp) and not (tp is int and isinstance(value, bool))) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(f.type)}")
    if tp is float:
        value = float(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")


def validate(cfg: Config) -> Config:
    """Type- and choice-check every field (also those a config file set directly)."""
    def walk(obj, prefix):
        for name, f in _fields(obj).items():
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + name + ".")
            else:
                setattr(obj, name, _convert(prefix + name, f, value))
    walk(cfg, "")
    for key in ("total_iters", "batch_size", "sample_interval", "ckpt_interval", "log_interval", "num_samples"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {_get(cfg, key)}")
    if cfg.ema.half_life_kimg <= 0 or (cfg.ema.rampup is not None and cfg.ema.rampup <= 0) or cfg.ema.start_iter < 0:
        raise ConfigError(f"ema: half_life_kimg and rampup must be positive and start_iter at least 0, got "
                          f"{cfg.ema.half_life_kimg}, {cfg.ema.rampup}, {cfg.ema.start_iter}")
    if cfg.ckpt_minutes < 0:
        raise ConfigError(f"ckpt_minutes: must be 0 (off) or more, got {cfg.ckpt_minutes}")
    if not cfg.dist_timeout_s > 0:
        raise ConfigError(f"dist_timeout_s: must be more than 0, got {cfg.dist_timeout_s}")
    if cfg.model.base_channels is not None and cfg.model.base_channels < 1:
        raise ConfigError(f"model.base_channels: must be at least 1, got {cfg.model.base_channels}")
    return cfg


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def override(cfg: Config, key: str, value: Any) -> Config:
    """Set a dotted key in place, type-checked; returns cfg."""
    valid = keys(cfg)
    if key not in valid:
        raise _unknown(key, valid)
    *parents, last = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, _convert(key, _fields(obj)[last], value))
    return cfg


def parse_overrides(cfg: Config, args: list[str]) -> Config:
    """Apply `--key=value` (or `--key value`) arguments."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key=value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"{arg} needs a value (--key=value)")
        override(cfg, key.replace("-", "_"), value)
        i += 1
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """The inverse of to_dict; unknown keys are errors (a checkpoint from a newer fastgan says so)."""
    cfg = Config()
    def walk(obj, data, prefix):
        fields = _fields(obj)
        for name, value in data.items():
            if name not in fields:
                raise _unknown(prefix + name, keys(cfg))
            if isinstance(value, dict):
                walk(getattr(obj, name), value, prefix + name + ".")
            else:
                setattr(obj, name, value)
    walk(cfg, d, "")
    return validate(cfg)


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a .py config file (module-level `config`) or a saved config.json, then apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".json":
        cfg = from_dict(json.loads(path.read_text()))
    else:
        scope = runpy.run_path(str(path))
        cfg = scope.get("config")
        if not isinstance(cfg, Config):
            raise ConfigError(f"{path} must define `config = Config(...)` (fastgan.config.Config)")
        cfg = copy.deepcopy(cfg)  # overrides never change the object the file built
    parse_overrides(cfg, list(overrides))
    return validate(cfg)


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def save(cfg: Config, path: str | Path) -> None:
    files.write_text(path, dumps(cfg) + "\n")


def describe() -> str:
    """Every key with its type, default and choices (for --help)."""
    lines = []
    def walk(obj, prefix):
        for name, f in _fields(obj).items():
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + name + ".")
                continue
            choices = f.metadata.get("choices")
            kind = "|".join(map(str, choices)) if choices else _type_name(f.type)
            help_ = f.metadata.get("help", "")
            lines.append(f"  --{prefix}{name}={value!r:<12} {kind}{'  ' + help_ if help_ else ''}")
    walk(Config(), "")
    return "\n".join(lines)
