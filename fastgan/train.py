"""Train a DCGAN from a config file.

    python fastgan/train.py CONFIG [--key=value ...] [--resume PATH] [--device cpu|cuda]
    torchrun --nproc_per_node=N fastgan/train.py CONFIG [--key=value ...]

Restarting with the same work_dir resumes from its newest readable checkpoint; a finished run
says so and exits. Outputs in work_dir: config.json, log.jsonl, training_samples/iter_N.png,
real.png and progress.gif, ckpt/iter_N.pt, generator.safetensors, report.html (and TensorBoard
events when tensorboard is installed).

Read top to bottom: the run's state (`Run`, with what the loop does at its intervals: samples,
evaluation, checkpoints, the end), how a run starts (fresh, resumed, or from another checkpoint's
weights), then `train()`, whose loop has one section per job: step, log, sample, evaluate,
checkpoint. The iteration itself is fastgan/step.py (fastgan/cuda_graph.py on a GPU); signals,
timed checkpoints and dead ranks are fastgan/faults.py; the log is fastgan/runlog.py.
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

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastgan import animation, checkpoint, convert, distrib, errors, faults, images, report, selfcheck
from fastgan import config as config_mod
from fastgan.data import build_loader
from fastgan.errors import UserError
from fastgan.metrics import LOWER_IS_BETTER, Evaluator
from fastgan.models import build, num_params, resolve_backend
from fastgan.progress import Progress
from fastgan.runlog import RunLog
from fastgan.step import OUTPUTS, TrainStep

USAGE = """usage: python fastgan/train.py CONFIG [--key=value ...] [--resume PATH] [--device cpu|cuda]
       torchrun --nproc_per_node=N fastgan/train.py CONFIG [--key=value ...]

CONFIG is a Python config file (configs/...) or a saved config.json. Restarting with the same
work_dir resumes from the newest readable checkpoint; --resume PATH starts from that one.

config keys (--key=value; nested keys dotted, e.g. --model.base_channels=64):
"""


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


# ---------------------------------------------------------------------------------------------
# The run's state, and what the loop does at its intervals

@dataclass
class Run:
    """What the loop's sections share. G_out draws the sample grids, the evaluations and
    generator.safetensors: the EMA generator when there is one, else G."""
    cfg: config_mod.Config
    d: distrib.Dist
    log: RunLog
    G: torch.nn.Module
    D: torch.nn.Module
    G_out: torch.nn.Module
    noise_gen: torch.Generator
    fixed_z: torch.Tensor              # the grids' noise: the same on every rank, device and resume
    step: TrainStep | None = None      # None only for a run that had already finished
    best: dict | None = None           # the best evaluation so far: {"metric", "value", "iter"}

    @property
    def work(self) -> Path:
        return Path(self.cfg.work_dir)

    def write_samples(self, iteration: int) -> None:
        """training_samples/iter_N.png from G_out in eval mode (running statistics from rank 0),
        and progress.gif rebuilt from the grids."""
        distrib.broadcast_buffers(self.d, self.G_out)
        if not self.d.main:
            return
        with torch.no_grad(), _eval_mode(self.G_out):
            fake = self.G_out(self.fixed_z)
        grid = images.make_grid(fake, nrow=max(1, math.isqrt(self.cfg.num_samples)))
        with self.log.writes("sample grids"):
            path = images.save_png(grid, self.work / "training_samples" / f"iter_{iteration}.png")
            animation.write_progress_gif(path.parent)
        self.log.image("samples", grid, iteration)

    def save_checkpoint(self, iteration: int, path: Path | None = None) -> Path | None:
        """ckpt/iter_N.pt (or `path`) with every rank's RNG states gathered to rank 0. Returns
        the path on rank 0."""
        distrib.broadcast_buffers(self.d, self.G, self.D)
        rng = distrib.gather_objects(self.d, {**checkpoint.rng_state(), "noise": self.noise_gen.get_state()})
        if not self.d.main:
            return None
        state = {"iteration": iteration, "G": checkpoint.clean_state_dict(self.G),
                 "D": checkpoint.clean_state_dict(self.D), **self.step.state_dict(), "rng": rng,
                 "world_size": self.d.world_size, "best": self.best, "config": config_mod.to_dict(self.cfg)}
        return checkpoint.save(state, path or self.work / "ckpt" / f"iter_{iteration}.pt")

    def evaluate(self, evaluator: Evaluator, iteration: int) -> None:
        """The config's metrics on G_out; ckpt/best.pt follows eval.best_metric."""
        distrib.broadcast_buffers(self.d, self.G_out)
        with torch.no_grad(), _eval_mode(self.G_out):
            results = evaluator(self.G_out)
        self.log.record({"iter": iteration, **{f"eval/{k}": v for k, v in results.items()}, "time": time.time()})
        self.log.say(f"eval at {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        name = self.cfg.eval.best_metric
        if not name or name not in results:
            return
        value, lower = results[name], LOWER_IS_BETTER.get(name, True)
        if self.best is None or (value < self.best["value"] if lower else value > self.best["value"]):
            self.best = {"metric": name, "value": value, "iter": iteration}
            self.save_checkpoint(iteration, path=self.work / "ckpt" / "best.pt")
            self.log.say(f"new best {name} {value:.4f}: ckpt/best.pt")

    def finish(self, iteration: int, ema: bool | None = None) -> None:
        """The last sample grid and generator.safetensors (also after a kill between them). ema:
        whether G_out holds EMA weights (default: whether it is the EMA generator)."""
        # Rank 0 decides whether the grid is missing (write_samples is a collective: ranks that
        # saw the folder differently, as on NFS, would hang).
        grid = self.work / "training_samples" / f"iter_{iteration}.png"
        if not distrib.gather_objects(self.d, self.d.main and grid.is_file())[0]:
            self.write_samples(iteration)
        if self.d.main:
            ema = self.G_out is not self.G if ema is None else ema
            checkpoint.save_generator(self.G_out, self.cfg, self.work / "generator.safetensors", ema=ema)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """The module in eval mode inside the block, in its previous mode after."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


# ---------------------------------------------------------------------------------------------
# How a run starts: fresh, resumed from a checkpoint, or from another checkpoint's weights

def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _find_start(cfg, d, resume: str | None, log: RunLog) -> tuple[Path, dict] | None:
    """The checkpoint to resume from: `resume` if given (unreadable is an error), else the newest
    readable one in work_dir/ckpt; None for a fresh run."""
    ckpt_dir = Path(cfg.work_dir) / "ckpt"
    found, error = None, None
    if resume:
        try:
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


def _restore(run: Run, path: Path, state: dict) -> None:
    """G, D, the optimizers, the EMA and every RNG state from a checkpoint."""
    for net, key in ((run.G, "G"), (run.D, "D")):   # a mismatch: one line naming the key and the config that fits
        convert.load_into(net, state[key], path, key)
    changed = run.step.load_state_dict(state)
    if changed:
        run.log.say(f"settings from the config, not the checkpoint: {', '.join(changed)}")
    rng, d = state.get("rng") or [], run.d
    if len(rng) == d.world_size:
        checkpoint.set_rng_state(rng[d.rank])
        run.noise_gen.set_state(rng[d.rank]["noise"])
    else:
        run.log.say(f"warning: checkpoint written by {len(rng)} processes, resuming with {d.world_size}: "
                    "the run continues, but not bit-identical to an uninterrupted one")
    run.log.say(f"resumed from {path} at iteration {state['iteration']}")
    run.log.record({"event": "resume", "iter": state["iteration"], "from": str(path), "time": time.time()})


def _init_from(cfg, G, D, found, log: RunLog) -> None:
    """init_from: a new run from another checkpoint's G and D; a run that already has checkpoints
    resumes from them instead (init_from only ever starts a run)."""
    if found:
        log.say(f"init_from={cfg.init_from} ignored: resuming from {found[0]}")
        return
    source = checkpoint.init_networks(cfg.init_from, G, D, log=log.say)
    log.say(f"G and D initialised from {cfg.init_from} ({source}); fresh optimizers, iteration 0")


def _read_losses(d, acc: torch.Tensor, count: int, iteration: int, ckpt_note: str) -> dict[str, float]:
    """The loop's one host sync: the step's outputs (OUTPUTS) averaged since the last read and over
    ranks; a NaN or Inf stops the run."""
    values = (distrib.all_sum(d, acc) / (count * d.world_size)).tolist()
    if not all(math.isfinite(v) for v in values):
        raise TrainingError(f"loss is not finite at iteration <= {iteration} "
                            f"({', '.join(f'{k}={v}' for k, v in zip(OUTPUTS, values))}); "
                            f"stopped without saving. {ckpt_note} Try a lower lr, amp=fp32, or another seed.")
    out = dict(zip(OUTPUTS, values))
    out["loss_d"] = out["loss_d_fake"] + out["loss_d_real"]
    return out


# ---------------------------------------------------------------------------------------------
# Training

def train(cfg, d: distrib.Dist, resume: str | None = None) -> int:
    """Run (or resume) training; returns the last iteration reached."""
    # -- set up: work_dir, log, networks (the fused kernels prove themselves on a GPU first) --------
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
    _seed_everything(cfg.seed + d.rank)        # everything random after init differs per rank
    noise_gen = torch.Generator(d.device).manual_seed(cfg.seed + d.rank)
    fixed_z = G.sample_noise(cfg.num_samples, generator=torch.Generator().manual_seed(cfg.seed)).to(d.device)

    # -- where to start: a finished run (nothing to train, so no self-check), a resumed one, init_from
    found = _find_start(cfg, d, resume, log)
    start = found[1]["iteration"] if found else 0
    if start >= cfg.total_iters:
        path, state = found
        key = "G_ema" if cfg.ema.enabled and "G_ema" in state else "G"
        convert.load_into(G, state[key], path, key)     # a config that no longer fits: one line
        G.backend = "torch"     # at most one grid to draw; the fused kernels are self-checked only to train
        Run(cfg, d, log, G, D, G_out=G, noise_gen=noise_gen, fixed_z=fixed_z).finish(start, ema=key == "G_ema")
        log.say(f"{work} already finished: {path.name} is at iteration {start} "
                f"(total_iters={cfg.total_iters}). Raise --total_iters to train further.")
        log.close()
        return start
    if backend == "triton" and d.device.type == "cuda":
        cfg, backend = selfcheck.settle(cfg, d, G, D, log.say)
    log.say(f"backend {backend} on {d.device} x{d.world_size}, amp {cfg.amp}, compile {cfg.compile}; "
            f"G {num_params(G):,} params, D {num_params(D):,} params")
    if cfg.init_from:
        _init_from(cfg, G, D, found, log)
    # Imported here, not at the top: it imports torch._dynamo, which imports triton, and triton must
    # see TRITON_INTERPRET (set above for the triton backend on a CPU) before it first loads.
    from fastgan.cuda_graph import build_step
    step = build_step(cfg, G, D, d.device, distributed=d.enabled, log=log.say)   # logs which step runs
    run = Run(cfg, d, log, G, D, G_out=G if step.ema is None else step.ema.module, noise_gen=noise_gen,
              fixed_z=fixed_z, step=step, best=found[1].get("best") if found else None)
    if step.ema is not None:
        e = cfg.ema
        log.say(f"ema: half-life {e.half_life_kimg:g} kimg, ramp-up {e.rampup}, from iteration {e.start_iter}; "
                "samples, evaluation and generator.safetensors use the EMA generator")
    if found:
        _restore(run, *found)
        del found

    # -- data and evaluation ----------------------------------------------------------------------
    loader = build_loader(cfg, rank=d.rank, world_size=d.world_size, device=d.device, start_iter=start, log=log.say)
    log.say(f"data: {loader.name}, {loader.num_images:,} images, {loader.batches_per_epoch:,} batches/epoch per rank")
    log.record({"event": "start", "start_iter": start, "device": str(d.device), "world_size": d.world_size,
                "backend": backend, "amp": cfg.amp, "compile": cfg.compile, "step": type(step).__name__,
                "loader": loader.name, "params_g": num_params(G), "params_d": num_params(D), "time": time.time()})
    evaluator = Evaluator(cfg, d.device, d.rank, d.world_size) if cfg.eval_interval > 0 else None
    reals = images.RealGrid(work / "training_samples" / "real.png", cfg.num_samples,
                            max(1, math.isqrt(cfg.num_samples)), active=d.main, writes=log.writes)

    # -- the loop -----------------------------------------------------------------------------------
    acc = torch.zeros(len(OUTPUTS), device=d.device)     # the step's outputs, summed on the device
    count, last_ckpt = 0, f"The last checkpoint is ckpt/iter_{start}.pt." if start else "No checkpoint was written."
    t_log, it_log, t0 = time.perf_counter(), start, time.time()
    progress.reset(start)
    guard = faults.Guard(cfg, d, work)                # SIGTERM/SIGINT, ckpt_minutes, a dead or stalled rank
    data = guard.watch(iter(loader), start)
    done = start
    for it in range(start, cfg.total_iters):
        # step: one iteration (D step, then G step), no host sync
        real = next(data)
        reals.add(real)
        acc += step.step(real, step.noise(cfg.batch_size, noise_gen))
        count += 1
        done = it + 1
        progress.update()
        final = done == cfg.total_iters
        due = guard.poll(done)                          # "signal" or "time": every rank agrees
        ckpt_now = done % cfg.ckpt_interval == 0 or final or due is not None

        # log: the one host sync, every log_interval (and before a checkpoint)
        if done % cfg.log_interval == 0 or ckpt_now:
            out = _read_losses(d, acc, count, done, last_ckpt)
            acc.zero_()
            count = 0
            now = time.perf_counter()
            img_s = (done - it_log) * cfg.batch_size * d.world_size / (now - t_log)
            t_log, it_log = now, done
            log.record({"iter": done, **{k: round(v, 6) for k, v in out.items()}, "img_per_s": round(img_s, 1),
                        "lr_g": cfg.optim.lr_g, "lr_d": cfg.optim.lr_d, "elapsed_s": round(time.time() - t0, 2),
                        "time": time.time()})
            log.say(f"iter {done}/{cfg.total_iters}  loss_d {out['loss_d']:.4f} "
                    f"(fake {out['loss_d_fake']:.4f}, real {out['loss_d_real']:.4f})  loss_g {out['loss_g']:.4f}  "
                    f"D(x) {out['d_real']:.4f}  D(G(z)) {out['d_fake']:.4f} / {out['d_fake_g']:.4f}  "
                    f"{img_s:,.1f} img/s")

        # sample: the fixed-noise grid
        if done % cfg.sample_interval == 0 or final:
            run.write_samples(done)

        # evaluate: metrics, and ckpt/best.pt
        if evaluator is not None and (done % cfg.eval_interval == 0 or final):
            run.evaluate(evaluator, done)

        # checkpoint: every ckpt_interval, every ckpt_minutes, on a stop signal, at the end
        if ckpt_now:
            path = run.save_checkpoint(done)
            guard.saved(done, path)                     # drops the timed one before it, if any
            last_ckpt = f"The last checkpoint is ckpt/iter_{done}.pt."
            if path:
                checkpoint.prune(path.parent, cfg.keep_ckpts)   # then the oldest beyond keep_ckpts
                log.say(f"saved {path}")
                report.write_quietly(work, log.say, log.writes)
        if guard.stopping:
            break

    # -- the end: stopped by a signal, or finished ----------------------------------------------------
    progress.close()
    reals.close()
    guard.close()
    if guard.stopping and done < cfg.total_iters:   # exit 130/143 with how to continue
        log.close()
        raise guard.interrupted(done)
    run.finish(cfg.total_iters)
    if d.main:
        report.write_quietly(work, log.say, log.writes)
    log.say(f"done: {work / 'generator.safetensors'}")
    log.close()
    return cfg.total_iters


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
