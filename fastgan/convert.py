"""Weights in other layouts, read safely and brought to fastgan's models.

- Reading: every .pt/.pth goes through `torch_load`, i.e. `torch.load(weights_only=True)`. Objects a
  file holds besides tensors and plain data (mmengine's HistoryBuffer in MMagic's message_hub, numpy
  arrays and scalars in MMGen's meta) are never unpickled: each class or function the file names is
  replaced by an inert stand-in that only keeps its arguments. If the weights themselves need one,
  or the file names os/sys functions, fastgan refuses the file in one line.
- fastgan checkpoints written before the parameter names became MMGeneration's (`to_rgb`,
  `img2feat`, `downsampling.{i}`, `decision`) are renamed by `upgrade_keys`, the one place that
  knows the old names.
- MMGeneration (mmcv: {'meta', 'state_dict'[, 'optimizer']}) and MMagic (mmengine: the same plus
  'message_hub', ...) DCGAN checkpoints: the state_dict is found, `module.` / `_orig_mod.` and the
  `generator.` / `discriminator.` / `generator_ema.` prefixes are stripped, and the weights are
  converted from BGR (what MMGen trains in) to RGB: G's output channels, D's input channels.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgan.errors import UserError, first_line


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message is one line a person can act on."""


# -- reading without unpickling objects -------------------------------------------------------

class StandIn:
    """Takes the place of a class or function a checkpoint names and fastgan does not need: it
    keeps the arguments and state it is given and runs nothing."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<not loaded: {self.name}>"


_UNSUPPORTED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _stand_ins(names) -> list[tuple[type, str]]:
    return [(type("StandIn", (StandIn,), {"name": n}), n) for n in sorted(names)]


def _unpickler_message(text: str) -> str:
    """The unpickler's own words from torch's wrapped message, without its paragraphs of advice."""
    text = text.replace("WeightsUnpickler error: ", "\n\n")
    kept = [p.strip() for p in text.split("\n\n")
            if p.strip() and not re.search(r"weights.only|Weights only|documentation", p, re.IGNORECASE)]
    return kept[0].splitlines()[0] if kept else "not a weights-only checkpoint"


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
    return f"cannot read checkpoint {path}: truncated or damaged ({first_line(e).split('. ')[0][:160]})"


def torch_load(path: str | Path):
    """torch.load(path, weights_only=True), with stand-ins for the objects the file names."""
    path = Path(path)
    names: set[str] = set()
    try:
        names.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:    # not a zip checkpoint (legacy format, or not torch's): found while loading
        pass
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(_stand_ins(names)):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch wraps the unpickler's own message in advice to load with weights_only=False,
            # which fastgan never does: only that message is kept.
            msg = _unpickler_message(str(e))
            found = _UNSUPPORTED.search(msg)
            if found and found.group(1) not in names:
                names.add(found.group(1))
                continue
            blocked = re.search(r"GLOBAL (\S+) whose module", msg)
            if not (found or blocked or "unrecognized function" in msg or "Can only create new object" in msg):
                raise CheckpointError(unreadable(path, e)) from None
            what = f"a reference to {blocked.group(1)}" if blocked else "Python objects that need code to build"
            raise CheckpointError(f"refusing {path}: it holds {what}; fastgan loads only tensors and "
                                  "plain data, never arbitrary pickled objects") from None
        except Exception as e:    # truncated zip, empty file, not a checkpoint at all
            raise CheckpointError(unreadable(path, e)) from None
    raise CheckpointError(f"refusing {path}: it names too many Python objects to stand in for")


def _plain(sd: dict, path, what: str) -> dict[str, torch.Tensor]:
    """A state_dict of tensors only (a stand-in here would mean the weights need code to build)."""
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"refusing {path}: its {what} weights hold Python objects "
                              f"({bad[0]}: {sd[bad[0]]!r}), not tensors")
    return sd


# -- names -------------------------------------------------------------------------------------

def upgrade_keys(sd: dict) -> dict:
    """fastgan's names before they became MMGeneration's -> MMGeneration's. D's img2feat is
    downsamples.0 and downsampling.{i} is downsamples.{i+1}. Current names pass unchanged."""
    out = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in ("to_rgb", "decision"):
            key = f"output_layer.{rest}"
        elif head == "img2feat":
            key = f"downsamples.0.{rest}"
        elif head == "downsampling":
            i, _, rest = rest.partition(".")
            key = f"downsamples.{int(i) + 1}.{rest}"
        out[key] = value
    return out


def _strip(key: str, prefixes=("module.", "_orig_mod.")) -> str:
    while key.startswith(prefixes):
        key = key.split(".", 1)[1]
    return key


def clean_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without torch.compile's `_orig_mod.` or DDP's `module.` prefixes, on the CPU."""
    return {_strip(key): value.detach().cpu().clone() for key, value in module.state_dict().items()}


def network_kind(sd: dict) -> str | None:
    """'G' or 'D' from a bare state_dict's keys, None if it is neither."""
    keys = set(upgrade_keys({_strip(k): None for k in sd}))
    if "noise2feat.conv.weight" in keys:
        return "G"
    if "downsamples.0.conv.weight" in keys:
        return "D"
    return None


@dataclass
class Weights:
    """What a checkpoint file holds, in fastgan's names and RGB."""
    source: str
    G: dict | None = None
    D: dict | None = None
    G_ema: dict | None = None
    config: dict | None = None      # fastgan's stored config, when the file has one
    ema_only: bool = False          # a generator.safetensors written from the EMA generator
    notes: list[str] = field(default_factory=list)


# -- MMGeneration / MMagic ---------------------------------------------------------------------

MMGEN_PREFIXES = {"generator.": "G", "discriminator.": "D", "generator_ema.": "G_ema"}


def _mmgen_state_dict(state) -> tuple[dict, str] | None:
    """(the model's state_dict, the layout's name) when `state` is an MMGen/MMagic checkpoint."""
    if not isinstance(state, dict):
        return None
    if isinstance(state.get("state_dict"), dict):
        sd = state["state_dict"]
        layout = "mmengine" if "message_hub" in state else "mmcv"
    else:
        sd, layout = state, "bare state_dict"
    if any(_strip(str(k)).startswith(tuple(MMGEN_PREFIXES)) for k in sd):
        return sd, layout
    return None


def is_mmgen(state) -> bool:
    return _mmgen_state_dict(state) is not None


def bgr_to_rgb(sd: dict[str, torch.Tensor], kind: str) -> bool:
    """Reverse the colour channels in place: G's output (output_layer weight dim 1 and bias), D's
    input (downsamples.0 weight dim 1). One-channel models are left alone; returns whether it flipped."""
    key = "output_layer.conv.weight" if kind.startswith("G") else "downsamples.0.conv.weight"
    if key not in sd or sd[key].shape[1] != 3:
        return False
    sd[key] = sd[key].flip(1).contiguous()
    if kind.startswith("G") and "output_layer.conv.bias" in sd:
        sd["output_layer.conv.bias"] = sd["output_layer.conv.bias"].flip(0).contiguous()
    return True


def from_mmgen(state, path) -> Weights | None:
    """G, D and G_ema (RGB) from an MMGeneration or MMagic checkpoint; None if it is not one."""
    found = _mmgen_state_dict(state)
    if found is None:
        return None
    sd, layout = found
    nets: dict[str, dict] = {}
    for key, value in sd.items():
        key = _strip(str(key))
        for prefix, kind in MMGEN_PREFIXES.items():
            if key.startswith(prefix):
                # MMagic's EMA wraps the generator (generator_ema.module.*) and counts its steps.
                name = _strip(key[len(prefix):])
                if name not in ("steps", "n_averaged"):
                    nets.setdefault(kind, {})[name] = value
                break
    w = Weights(source=f"MMGeneration/MMagic checkpoint ({layout} layout)")
    flipped = []
    for kind, net_sd in nets.items():
        net_sd = _plain(net_sd, path, {"G": "generator", "D": "discriminator", "G_ema": "generator_ema"}[kind])
        if bgr_to_rgb(net_sd, kind):
            flipped.append({"G": "generator", "D": "discriminator", "G_ema": "generator_ema"}[kind])
        setattr(w, kind, net_sd)
    if flipped:
        w.notes.append(f"{path}: {', '.join(flipped)} converted from MMGeneration's BGR to RGB")
    else:
        w.notes.append(f"{path}: one-channel model, no BGR -> RGB conversion needed")
    return w


# -- any file ----------------------------------------------------------------------------------

def read_torch(path: str | Path) -> Weights:
    """A fastgan training checkpoint, an MMGeneration/MMagic checkpoint, or a bare G or D state_dict."""
    state = torch_load(path)
    if isinstance(state, dict) and "G" in state and "D" in state:
        w = Weights(source="fastgan checkpoint", config=state.get("config"))
        w.G, w.D = (_plain(upgrade_keys(state[k]), path, k) for k in ("G", "D"))
        if isinstance(state.get("G_ema"), dict):
            w.G_ema = _plain(upgrade_keys(state["G_ema"]), path, "G_ema")
        return w
    w = from_mmgen(state, path)
    if w is not None:
        return w
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = network_kind(state)
        if kind:
            w = Weights(source=f"bare {'generator' if kind == 'G' else 'discriminator'} state_dict")
            setattr(w, kind, upgrade_keys({_strip(k): v for k, v in state.items()}))
            return w
    raise CheckpointError(f"{path} holds no DCGAN weights fastgan knows (expected a fastgan checkpoint, "
                          "an MMGeneration/MMagic checkpoint, or a G or D state_dict)")


# -- fitting a model ---------------------------------------------------------------------------

def model_fits(sd: dict[str, torch.Tensor], kind: str) -> str | None:
    """The model.* overrides a G or D state_dict was made with, as far as its shapes tell."""
    try:
        if kind.startswith("G"):
            stages = 1 + sum(1 for k in sd if re.fullmatch(r"upsampling\.\d+\.conv\.weight", k))
            out = sd["output_layer.conv.weight"]              # [base, channels, 4, 4]
            base, channels, bias = out.shape[0], out.shape[1], "output_layer.conv.bias" in sd
        else:
            stages = sum(1 for k in sd if re.fullmatch(r"downsamples\.\d+\.conv\.weight", k))
            first = sd["downsamples.0.conv.weight"]           # [base, channels, 4, 4]
            base, channels, bias = first.shape[0], first.shape[1], "downsamples.0.conv.bias" in sd
    except (KeyError, IndexError, AttributeError):
        return None
    preset = "mmgen" if bias else "pytorch_examples"
    resolution = 4 * 2 ** stages
    if resolution not in (32, 64, 128) or channels not in (1, 3):
        return None
    default = {"mmgen": 128, "pytorch_examples": 64}[preset]
    width = "" if base == default else f" --model.base_channels={base}"
    return f"--model.preset={preset} --model.resolution={resolution} --model.channels={channels}{width}"


def load_into(net: torch.nn.Module, sd: dict[str, torch.Tensor], path, what: str) -> None:
    """net.load_state_dict(sd), or one line naming the first mismatch and the config that fits."""
    mine = net.state_dict()
    problem = None
    for key, value in mine.items():
        if key not in sd:
            problem = f"{key} is missing from the checkpoint"
        elif sd[key].shape != value.shape:
            problem = f"{key} is {list(sd[key].shape)} in the checkpoint, {list(value.shape)} in the model"
        if problem:
            break
    extra = [k for k in sd if k not in mine]
    if problem is None and extra:
        problem = f"the checkpoint has {extra[0]}, which the model lacks"
    if problem is None:
        net.load_state_dict(sd)
        return
    blocks = net.blocks() if hasattr(net, "blocks") else []
    width = ""
    if blocks:      # the base width: G's last hidden layer, D's first
        width = f", width {blocks[-1].conv.in_channels if what.startswith('G') else blocks[0].conv.out_channels}"
    model = ", ".join(f"{k}={getattr(net, k)}" for k in ("preset", "resolution", "channels") if hasattr(net, k)) + width
    fits = model_fits(sd, what)
    hint = f"; it fits {fits}" if fits else ""
    raise CheckpointError(f"{path}: the {'generator' if what.startswith('G') else 'discriminator'} does not fit "
                          f"the configured model ({model}): {problem}{hint}")
