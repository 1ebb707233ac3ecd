"""Train a DCGAN from a config file.

    python fastgan/train.py CONFIG [--key=value ...] [--resume PATH] [--device cpu|cuda]
    torchrun --nproc_per_node=N fastgan/train.py CONFIG [--key=value ...]

Restarting with the same work_dir resumes from its newest readable checkpoint; a finished run
says so and exits. Outputs in work_dir: config.json, log.jsonl, training_samples/iter_N.png,
real.png and progress.gif, ckpt/iter_N.pt, generator.safetensors, report.html (and TensorBoard
events when tensorboard is installed).
"""

import os
import sys

# Run as a file, Python puts fastgan/ itself first on sys.path, where its modules could shadow
# others by name; the installed package is what we import.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

try:
    import fastgan  # noqa: F401
except ImportError:
    sys.exit("fastgan is not installed: run `pip install -e .` in the repository root")

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from fastgan import animation, checkpoint, convert, distrib, errors, faults, images, report, selfcheck
from fastgan import config as config_mod
from fastgan.models import build, num_params, resolve_backend
from fastgan.errors import UserError
from fastgan.progress import Progress
from fastgan.step import OUTPUTS, TrainStep

USAGE = """usage: python fastgan/train.py CONFIG [--key=value ...] [--resume PATH] [--device cpu|cuda]
       torchrun --nproc_per_node=N fastgan/train.py CONFIG [--key=value ...]

CONFIG is a Python config file (configs/...) or a saved config.json. Restarting with the same
work_dir resumes from the newest readable checkpoint; --resume PATH starts from that one.

config keys (--key=value; nested keys dotted, e.g. --model.base_channels=64):
"""

LOSS_NAMES = OUTPUTS     # losses, then D(x), D(G(z)) in the D step and in the G step


class TrainingError(UserError, RuntimeError):
    pass


def parse_args(argv: list[str]) -> tuple[str, list[str], str | None, str | None]:
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
        print(USAGE + config_mod.describe())
        sys.exit(0)
    path, rest = argv[0], argv[1:]
    found = {"--resume": None, "--device": None}
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        name = arg.split("=", 1)[0]
        if name in found:
            if "=" in arg:
                found[name] = arg.split("=", 1)[1]
            elif i + 1 < len(rest):
                found[name] = rest[i + 1]
                i += 1
            else:
                sys.exit(f"{name} needs a value")
        else:
            overrides.append(arg)
        i += 1
    return path, overrides, found["--resume"], found["--device"]


class RunLog:
    """log.jsonl, TensorBoard and stdout, written by rank 0 only."""

    def __init__(self, cfg, d: distrib.Dist, progress: Progress):
        self.main, self.progress = d.main, progress
        self.path = Path(cfg.work_dir) / "log.jsonl"
        self.tb = None
        self.writes = faults.BestEffort(self.say)    # a full disk skips these; checkpoints stop the run
        if not self.main:
            return
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:      # a kill may have cut the last line short
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "a") as out:
                        out.write("\n")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(cfg.work_dir) / "tensorboard"))
        except ImportError:
            pass

    def say(self, message: str) -> None:
        if self.main:
            self.progress.write(message)

    def record(self, entry: dict) -> None:
        if not self.main:
            return
        with self.writes(f"{self.path}"):
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.tb is not None and "iter" in entry:
            with self.writes("TensorBoard events"):
                for k, v in entry.items():
                    if k not in ("iter", "time", "event") and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, entry["iter"])

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        if self.main and self.tb is not None:
            with self.writes("TensorBoard events"):
                self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _fixed_noise(cfg, G, device) -> torch.Tensor:
    """The sample grids' noise: from cfg.seed alone, drawn on the CPU, so the same on every
    rank, device and resume."""
    return G.sample_noise(cfg.num_samples, generator=torch.Generator().manual_seed(cfg.seed)).to(device)


def _write_samples(cfg, d, G, z, iteration: int, log: RunLog) -> None:
    """training_samples/iter_N.png from G in eval mode (running statistics synced from rank 0)."""
    distrib.broadcast_buffers(d, G)
    if not d.main:
        return
    training = G.training
    G.eval()
    with torch.no_grad():
        fake = G(z)
    G.train(training)
    nrow = max(1, math.isqrt(cfg.num_samples))
    grid = images.make_grid(fake, nrow=nrow)
    with log.writes("sample grids"):
        path = images.save_png(grid, Path(cfg.work_dir) / "training_samples" / f"iter_{iteration}.png")
        animation.write_progress_gif(path.parent)
    log.image("samples", grid, iteration)


def _save_checkpoint(cfg, d, G, D, step: TrainStep, noise_gen, iteration: int, best: dict | None,
                     path: Path | None = None) -> Path | None:
    """ckpt/iter_N.pt (every rank's RNG states gathered to rank 0), then prune."""
    distrib.broadcast_buffers(d, G, D)
    rng = distrib.gather_objects(d, {**checkpoint.rng_state(), "noise": noise_gen.get_state()})
    if not d.main:
        return None
    state = {"iteration": iteration, "G": checkpoint.clean_state_dict(G), "D": checkpoint.clean_state_dict(D),
             **step.state_dict(), "rng": rng, "world_size": d.world_size, "best": best,
             "config": config_mod.to_dict(cfg)}
    ckpt_dir = Path(cfg.work_dir) / "ckpt"
    path = checkpoint.save(state, path or ckpt_dir / f"iter_{iteration}.pt")
    checkpoint.prune(ckpt_dir, cfg.keep_ckpts)
    return path


def _find_start(cfg, d, resume: str | None, log: RunLog) -> tuple[Path, dict] | None:
    ckpt_dir = Path(cfg.work_dir) / "ckpt"
    found, error = None, None
    if resume:
        try:        # named explicitly: unreadable is an error
            found = Path(resume), checkpoint.load(resume)
        except checkpoint.CheckpointError as e:
            error = str(e)
    else:
        if d.main:
            for p in checkpoint.remove_temp_files(ckpt_dir):
                log.say(f"removed {p.name}, left by an interrupted write")
        distrib.barrier(d)
        found = checkpoint.load_latest(ckpt_dir, warn=lambda m: log.say(f"warning: {m}"))
    # Every rank reads the checkpoint itself: on several nodes it must lie in a folder every node
    # sees, or the ranks would start from different iterations and hang in the first all-reduce.
    seen = distrib.gather_objects(d, error or (found[1]["iteration"] if found else 0))
    if len(set(seen)) > 1:
        raise checkpoint.CheckpointError(f"the ranks disagree about {resume or ckpt_dir} (per rank: {seen}); "
                                         "checkpoints and work_dir must be in a folder every node sees")
    if error:
        raise checkpoint.CheckpointError(error)
    return found


def _restore(path: Path, state: dict, d, G, D, step: TrainStep, noise_gen, log: RunLog) -> None:
    for net, key in ((G, "G"), (D, "D")):   # a mismatch is one line naming the key and the config that fits
        convert.load_into(net, state[key], path, key)
    changed = step.load_state_dict(state)
    if changed:
        log.say(f"settings from the config, not the checkpoint: {', '.join(changed)}")
    rng = state.get("rng") or []
    if len(rng) == d.world_size:
        checkpoint.set_rng_state(rng[d.rank])
        noise_gen.set_state(rng[d.rank]["noise"])
    else:
        log.say(f"warning: checkpoint written by {len(rng)} processes, resuming with {d.world_size}: "
                "the run continues, but not bit-identical to an uninterrupted one")


def _init_from(cfg, G, D, found, log: RunLog) -> None:
    """init_from: a new run from another checkpoint's G and D; a run that already has checkpoints
    resumes from them instead (init_from only ever starts a run)."""
    if found:
        log.say(f"init_from={cfg.init_from} ignored: resuming from {found[0]}")
        return
    source = checkpoint.init_networks(cfg.init_from, G, D, log=log.say)
    log.say(f"G and D initialised from {cfg.init_from} ({source}); fresh optimizers, iteration 0")


def _finish(cfg, d, G, fixed_z, iteration: int, log: RunLog, ema: bool = False) -> None:
    """Final sample grid and generator.safetensors (also after a kill between them); G is the EMA
    generator when `ema`."""
    work = Path(cfg.work_dir)
    if not (work / "training_samples" / f"iter_{iteration}.png").is_file():
        _write_samples(cfg, d, G, fixed_z, iteration, log)
    if d.main:
        checkpoint.save_generator(G, cfg, work / "generator.safetensors", ema=ema)


def _read_losses(d, acc: torch.Tensor, count: int, iteration: int, log: RunLog,
                 ckpt_note: str) -> dict[str, float]:
    """The one host sync: mean losses since the last read, summed over ranks; NaN/Inf stops."""
    total = distrib.all_sum(d, acc) / (count * d.world_size)
    values = total.tolist()
    if not all(math.isfinite(v) for v in values):
        raise TrainingError(f"loss is not finite at iteration <= {iteration} "
                            f"({', '.join(f'{k}={v}' for k, v in zip(LOSS_NAMES, values))}); "
                            f"stopped without saving. {ckpt_note} Try a lower lr, amp=fp32, or another seed.")
    out = dict(zip(LOSS_NAMES, values))
    out["loss_d"] = out["loss_d_fake"] + out["loss_d_real"]
    return out


def train(cfg, d: distrib.Dist, resume: str | None = None) -> int:
    """Run (or resume) training; returns the last iteration reached."""
    work = Path(cfg.work_dir)
    backend = resolve_backend(cfg.backend, d.device)
    if backend == "triton" and d.device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before fastgan.kernels first loads
    progress = Progress(cfg.total_iters, unit_items=cfg.batch_size * d.world_size, enabled=d.main)
    if d.main:
        errors.writable_dir(work, "work_dir", "pass --work_dir=DIR with a folder you can write")
        config_mod.save(cfg, work / "config.json")
    distrib.barrier(d)
    log = RunLog(cfg, d, progress)
    log.say(f"config:\n{config_mod.dumps(cfg)}")

    _seed_everything(cfg.seed)                 # identical init on every rank
    G, D = build(cfg.model, backend)
    G.deterministic = D.deterministic = cfg.deterministic
    G.to(d.device)
    D.to(d.device)
    if backend == "triton" and d.device.type == "cuda":     # the fused kernels prove themselves first
        cfg, backend = selfcheck.settle(cfg, d, G, D, log.say)
    log.say(f"backend {backend} on {d.device} x{d.world_size}, amp {cfg.amp}, compile {cfg.compile}; "
            f"G {num_params(G):,} params, D {num_params(D):,} params")
    _seed_everything(cfg.seed + d.rank)        # everything random after init differs per rank
    noise_gen = torch.Generator(d.device).manual_seed(cfg.seed + d.rank)
    fixed_z = _fixed_noise(cfg, G, d.device)

    found = _find_start(cfg, d, resume, log)
    start, best = 0, None
    if found:
        path, state = found
        start, best = state["iteration"], state.get("best")
        if start >= cfg.total_iters:
            ema = cfg.ema.enabled and "G_ema" in state
            G.load_state_dict(state["G_ema" if ema else "G"])
            _finish(cfg, d, G, fixed_z, start, log, ema=ema)
            log.say(f"{work} already finished: {path.name} is at iteration {start} "
                    f"(total_iters={cfg.total_iters}). Raise --total_iters to train further.")
            log.close()
            return start
    if cfg.init_from:
        _init_from(cfg, G, D, found, log)
    from fastgan.graph import build_step     # the CUDA-graph step where it applies; logs which runs
    step = build_step(cfg, G, D, d.device, distributed=d.enabled, log=log.say)
    G_out = G if step.ema is None else step.ema.module      # draws samples, evaluations, generator.safetensors
    if step.ema is not None:
        e = cfg.ema
        log.say(f"ema: half-life {e.half_life_kimg:g} kimg, ramp-up {e.rampup}, from iteration {e.start_iter}; "
                "samples, evaluation and generator.safetensors use the EMA generator")
    if found:
        _restore(path, state, d, G, D, step, noise_gen, log)
        del state
        log.say(f"resumed from {path} at iteration {start}")
        log.record({"event": "resume", "iter": start, "from": str(path), "time": time.time()})

    from fastgan.data import build_loader
    loader = build_loader(cfg, rank=d.rank, world_size=d.world_size, device=d.device, start_iter=start, log=log.say)
    log.say(f"data: {loader.name}, {loader.num_images:,} images, {loader.batches_per_epoch:,} batches/epoch per rank")
    log.record({"event": "start", "start_iter": start, "device": str(d.device), "world_size": d.world_size,
                "backend": backend, "amp": cfg.amp, "compile": cfg.compile, "step": type(step).__name__,
                "loader": loader.name, "params_g": num_params(G), "params_d": num_params(D), "time": time.time()})
    evaluator = None
    if cfg.eval_interval > 0:
        from fastgan.metrics import LOWER_IS_BETTER, Evaluator
        evaluator = Evaluator(cfg, d.device, d.rank, d.world_size)

    acc = torch.zeros(len(LOSS_NAMES), device=d.device)
    count, last_ckpt = 0, f"The last checkpoint is ckpt/iter_{start}.pt." if start else "No checkpoint was written."
    t_log, it_log, t0 = time.perf_counter(), start, time.time()
    progress.reset(start)
    reals = images.RealGrid(work / "training_samples" / "real.png", cfg.num_samples,
                            max(1, math.isqrt(cfg.num_samples)), active=d.main)
    guard = faults.Guard(cfg, d, work)                # SIGTERM/SIGINT, ckpt_minutes, a dead or stalled rank
    data = guard.watch(iter(loader), start)
    for it in range(start, cfg.total_iters):
        real = next(data)
        reals.add(real)
        acc += step.step(real, step.noise(cfg.batch_size, noise_gen))
        count += 1
        done = it + 1
        progress.update()
        final = done == cfg.total_iters
        due = guard.poll(done)                          # "signal" or "time": every rank agrees
        ckpt_now = done % cfg.ckpt_interval == 0 or final or due is not None
        if done % cfg.log_interval == 0 or ckpt_now:
            losses = _read_losses(d, acc, count, done, log, last_ckpt)
            acc.zero_()
            count = 0
            now = time.perf_counter()
            img_s = (done - it_log) * cfg.batch_size * d.world_size / (now - t_log)
            t_log, it_log = now, done
            entry = {"iter": done, **{k: round(v, 6) for k, v in losses.items()}, "img_per_s": round(img_s, 1),
                     "lr_g": cfg.optim.lr_g, "lr_d": cfg.optim.lr_d, "elapsed_s": round(time.time() - t0, 2),
                     "time": time.time()}
            log.record(entry)
            log.say(f"iter {done}/{cfg.total_iters}  loss_d {losses['loss_d']:.4f} "
                    f"(fake {losses['loss_d_fake']:.4f}, real {losses['loss_d_real']:.4f})  "
                    f"loss_g {losses['loss_g']:.4f}  D(x) {losses['d_real']:.4f}  "
                    f"D(G(z)) {losses['d_fake']:.4f} / {losses['d_fake_g']:.4f}  {img_s:,.1f} img/s")
        if done % cfg.sample_interval == 0 or final:
            _write_samples(cfg, d, G_out, fixed_z, done, log)
        if evaluator is not None and (done % cfg.eval_interval == 0 or final):
            best = _evaluate(cfg, d, G, D, step, noise_gen, evaluator, LOWER_IS_BETTER, done, best, log)
        if ckpt_now:
            path = _save_checkpoint(cfg, d, G, D, step, noise_gen, done, best)
            guard.saved(done, path)
            last_ckpt = f"The last checkpoint is ckpt/iter_{done}.pt."
            if path:
                log.say(f"saved {path}")
                report.write_quietly(work, log.say, log.writes)
        if guard.stopping:
            break
    progress.close()
    reals.close()
    guard.close()
    if guard.stopping:                              # exit 130/143 with how to continue
        log.close()
        raise guard.interrupted(done)
    _finish(cfg, d, G_out, fixed_z, cfg.total_iters, log, ema=step.ema is not None)
    if d.main:
        report.write_quietly(work, log.say, log.writes)
    log.say(f"done: {work / 'generator.safetensors'}")
    log.close()
    return cfg.total_iters


def _evaluate(cfg, d, G, D, step, noise_gen, evaluator, lower_is_better, iteration, best, log):
    """Metrics every eval_interval (of the EMA generator when there is one); ckpt/best.pt follows
    cfg.eval.best_metric."""
    G_eval = G if step.ema is None else step.ema.module
    distrib.broadcast_buffers(d, G_eval)
    training = G_eval.training
    G_eval.eval()
    with torch.no_grad():
        results = evaluator(G_eval)
    G_eval.train(training)
    log.record({"iter": iteration, **{f"eval/{k}": v for k, v in results.items()}, "time": time.time()})
    log.say(f"eval at {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    name = cfg.eval.best_metric
    if name and name in results:
        value, lower = results[name], lower_is_better.get(name, True)
        if best is None or (value < best["value"] if lower else value > best["value"]):
            best = {"metric": name, "value": value, "iter": iteration}
            _save_checkpoint(cfg, d, G, D, step, noise_gen, iteration, best,
                             path=Path(cfg.work_dir) / "ckpt" / "best.pt")
            log.say(f"new best {name} {value:.4f}: ckpt/best.pt")
    return best


def main(argv: list[str] | None = None) -> int:
    path, overrides, resume, device = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_mod.load(path, overrides)        # a ConfigError is one line (errors.main)
    d = distrib.setup(device, cfg.dist_timeout_s)
    try:
        train(cfg, d, resume)
    except torch.OutOfMemoryError as e:
        raise errors.out_of_memory(e, faults.memory_advice(cfg)) from None
    distrib.cleanup()     # not after an error: errors.main asks the heartbeats which rank failed
    return 0


if __name__ == "__main__":
    errors.main(main)
