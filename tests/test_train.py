"""The training loop: the iteration against a hand-written MMGen/pytorch-examples reference, AMP,
compile, a CPU smoke run, exact resume, a real kill -9, NaN stop, torchrun with 2 processes.

About 2-3 minutes on 2 cores: tiny models (32x32, base_channels 8, batch 8) on 64 synthetic faces.
"""

import copy
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastgan import checkpoint as ck
from fastgan import config as C
from fastgan import images
from fastgan.distrib import Dist
from fastgan.models import build
from fastgan.step import TrainStep
from fastgan.train import TrainingError, train
from runs import ROOT, TRAIN, log_entries, run_script, tiny, tiny_args

@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    """A tiny run (tests/runs.py) with the raw G: these tests follow it; tests/test_ema.py runs with the EMA."""
    return tiny_args(tmp_path_factory.mktemp("data"), "--ema.enabled=false")


# -- the iteration -----------------------------------------------------------------------------

def reference_iteration(recipe, G, D, opt_g, opt_d, real, z):
    """MMGen's StaticUnconditionalGAN.train_step and pytorch/examples dcgan/main.py, written out."""
    bce = F.binary_cross_entropy_with_logits
    if recipe == "mmgen":
        for p in D.parameters():
            p.requires_grad_(True)
        opt_d.zero_grad()
        with torch.no_grad():
            fake = G(z[0])
        pred_fake = D(fake)
        pred_real = D(real)
        loss_fake = bce(pred_fake, torch.zeros_like(pred_fake))
        loss_real = bce(pred_real, torch.ones_like(pred_real))
        (loss_fake + loss_real).backward()
        opt_d.step()
        for p in D.parameters():
            p.requires_grad_(False)
        opt_g.zero_grad()
        pred = D(G(z[1]))
        loss_g = bce(pred, torch.ones_like(pred))
        loss_g.backward()
        opt_g.step()
        for p in D.parameters():
            p.requires_grad_(True)
    else:
        D.zero_grad()
        pred_real = D(real)
        loss_real = bce(pred_real, torch.ones_like(pred_real))
        loss_real.backward()
        fake = G(z[0])
        pred_fake = D(fake.detach())
        loss_fake = bce(pred_fake, torch.zeros_like(pred_fake))
        loss_fake.backward()
        opt_d.step()
        G.zero_grad()
        pred = D(fake)
        loss_g = bce(pred, torch.ones_like(pred))
        loss_g.backward()
        opt_g.step()
    d_out = [torch.sigmoid(p).mean() for p in (pred_real, pred_fake, pred)]     # D(x), D(G(z)) before/after
    return torch.stack([loss_fake, loss_real, loss_g, *d_out]).detach()


@pytest.mark.parametrize("recipe", ["mmgen", "pytorch_examples"])
def test_iteration_matches_reference(recipe):
    """Losses and D's mean outputs (sigmoid of the reference's own logits) agree each iteration."""
    cfg = C.Config(recipe=recipe, batch_size=6, model=C.ModelConfig(preset=recipe, resolution=32, base_channels=8))
    G, D = build(cfg.model)
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    step = TrainStep(cfg, G, D, torch.device("cpu"))
    o = cfg.optim
    opt_g = torch.optim.Adam(G2.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D2.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(3):
        real = torch.rand(6, 3, 32, 32) * 2 - 1
        z = step.noise(6, gen)
        assert z.shape == (2 if recipe == "mmgen" else 1, 6, 100)
        got = step.step(real, z)
        want = reference_iteration(recipe, G2, D2, opt_g, opt_d, real, z)
        assert got.shape == (6,) and ((got[3:] > 0) & (got[3:] < 1)).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Parameters and BN running statistics (which see every D and G call, in order) agree.
    for a, b in ((G, G2), (D, D2)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.requires_grad for p in D.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_run(amp):
    cfg = C.Config(amp=amp, batch_size=4, model=C.ModelConfig(resolution=32, base_channels=8))
    G, D = build(cfg.model)
    before = [p.detach().clone() for p in G.parameters()]
    step = TrainStep(cfg, G, D, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    # fp16: the GradScaler starts at 2**16 and skips steps whose grads overflow, halving the scale.
    for _ in range(20):
        losses = step.step(torch.rand(4, 3, 32, 32) * 2 - 1, step.noise(4, gen))
        if any(not torch.equal(a, b) for a, b in zip(before, G.parameters())):
            break
    else:
        pytest.fail("20 iterations never changed G")
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert step.scaler.is_enabled() == (amp == "fp16")


@pytest.mark.parametrize("recipe", ["mmgen", "pytorch_examples"])
def test_compiled_step_matches_eager(recipe):
    cfg = C.Config(recipe=recipe, batch_size=4, model=C.ModelConfig(preset=recipe, resolution=32, base_channels=4))
    G, D = build(cfg.model)
    eager = TrainStep(cfg, copy.deepcopy(G), copy.deepcopy(D), torch.device("cpu"))
    # aot_eager: dynamo and AOT autograd trace the step as inductor would see it, in seconds
    # instead of the minutes inductor's C++ codegen takes on 2 cores.
    compiled = TrainStep(dataclasses.replace(cfg, compile=True), G, D, torch.device("cpu"), compile_backend="aot_eager")
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):
        real = torch.rand(4, 3, 32, 32) * 2 - 1
        a = eager.step(real, eager.noise(4, gen_a))
        b = compiled.step(real, compiled.noise(4, gen_b))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)   # decompositions may reorder float sums


# -- whole runs --------------------------------------------------------------------------------

def test_smoke_run_writes_everything(tmp_path, data_args):
    work = tmp_path / "run"
    args = ["configs/quickstart.py", f"--work_dir={work}", *data_args, "--total_iters=6",
            "--sample_interval=3", "--ckpt_interval=2", "--keep_ckpts=2"]
    out = run_script(*args, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backend torch on cpu x1" in out.stdout and "data: " in out.stdout
    assert sorted(p.name for p in (work / "training_samples").iterdir()) == ["iter_3.png", "iter_6.png",
                                                                           "progress.gif", "real.png"]
    assert (work / "report.html").is_file()
    assert Image.open(work / "training_samples" / "iter_6.png").size == (2 * 34 + 2,) * 2     # 2x2 grid of 32 px
    assert [n for n, _ in ck.list_checkpoints(work / "ckpt")] == [6, 4]                     # keep_ckpts=2
    state = ck.load(work / "ckpt" / "iter_6.pt")
    assert state["iteration"] == 6 and state["config"]["total_iters"] == 6
    assert {"opt_g", "opt_d", "scaler", "rng"} <= set(state) and len(state["rng"]) == 1
    cfg = C.load(work / "config.json")
    assert cfg.total_iters == 6 and cfg.model.base_channels == 8
    G = ck.load_generator(work / "generator.safetensors")
    torch.testing.assert_close(G.state_dict()["output_layer.conv.weight"], state["G"]["output_layer.conv.weight"])
    entries = [e for e in log_entries(work) if "event" not in e]
    assert [e["iter"] for e in entries] == list(range(1, 7))
    for e in entries:
        assert {"loss_d", "loss_d_fake", "loss_d_real", "loss_g", "img_per_s", "lr_g", "time"} <= set(e)
        assert e["loss_d"] > 0 and e["loss_g"] > 0 and e["img_per_s"] > 0
        assert all(0 < e[k] < 1 for k in ("d_real", "d_fake", "d_fake_g"))
    # The same command again: finished, says so, changes nothing.
    mtime = (work / "ckpt" / "iter_6.pt").stat().st_mtime_ns
    again = run_script(*args, cwd=ROOT)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (work / "ckpt" / "iter_6.pt").stat().st_mtime_ns == mtime and len(log_entries(work)) == 7   # + start


@pytest.mark.parametrize("recipe", ["mmgen", "pytorch_examples"])
def test_resume_is_exact(tmp_path, data_args, recipe):
    """6 iterations in one run == 3, stop, resume to 6: same losses, weights, optimizer states."""
    extra = [f"--recipe={recipe}", f"--model.preset={recipe}", "--sample_interval=100", "--ckpt_interval=3",
             f"--seed={int(torch.randint(0, 1000, ()))}"]
    train(tiny(tmp_path / "a", data_args, *extra, "--total_iters=6"), Dist())
    train(tiny(tmp_path / "b", data_args, *extra, "--total_iters=3"), Dist())
    train(tiny(tmp_path / "b", data_args, *extra, "--total_iters=6"), Dist())
    losses = lambda w: [(e["iter"], e["loss_d"], e["loss_g"]) for e in log_entries(w) if "loss_g" in e]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert any(e.get("event") == "resume" and e["iter"] == 3 for e in log_entries(tmp_path / "b"))
    a, b = ck.load(tmp_path / "a/ckpt/iter_6.pt"), ck.load(tmp_path / "b/ckpt/iter_6.pt")
    for net in ("G", "D"):
        for name, x in a[net].items():
            assert torch.equal(x, b[net][name]), f"{net}.{name}"
    for opt in ("opt_g", "opt_d"):
        for i, s in a[opt]["state"].items():
            assert all(torch.equal(s[k], b[opt]["state"][i][k]) for k in s)
    assert torch.equal(a["rng"][0]["noise"], b["rng"][0]["noise"])


def test_kill_then_same_command_continues(tmp_path, data_args):
    """kill -9 mid-run, then damage what a kill can damage; the same command finishes the run."""
    work = tmp_path / "run"
    args = [ROOT / "configs" / "quickstart.py", f"--work_dir={work}", *data_args, "--total_iters=400",
            "--sample_interval=1000", "--ckpt_interval=2", "--keep_ckpts=3"]
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(ck.list_checkpoints(work / "ckpt")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = ck.list_checkpoints(work / "ckpt")
    assert len(found) >= 2 and found[0][0] < 400, "the run ended before it could be killed"
    (newest, newest_path), (second, _) = found[0], found[1]
    newest_path.write_bytes(newest_path.read_bytes()[:1000])       # cut short, as a non-atomic write would be
    (work / "ckpt" / f"iter_{newest + 2}.pt.tmp").write_bytes(b"partial")
    with open(work / "log.jsonl", "a") as f:
        f.write('{"iter": 99')                                      # a line the kill cut off
    out = run_script(*args, "--total_iters=" + str(second + 4))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"skipping cannot read checkpoint {newest_path}" in out.stdout
    assert f"resumed from {work / 'ckpt' / f'iter_{second}.pt'} at iteration {second}" in out.stdout
    assert not list((work / "ckpt").glob("*.tmp"))
    assert ck.load(work / "ckpt" / f"iter_{second + 4}.pt")["iteration"] == second + 4
    assert (work / "generator.safetensors").is_file()
    lines = (work / "log.jsonl").read_text().splitlines()
    assert lines[-1].startswith('{"iter": ' + str(second + 4)) and '{"iter": 99' in lines


def test_ranks_that_see_different_checkpoints_stop(tmp_path, data_args, monkeypatch):
    """Several nodes without a shared work_dir: rank 1 finds no checkpoint where rank 0 finds one.
    Every rank must stop with the reason (not hang, not train from two different states)."""
    train(tiny(tmp_path, data_args, "--total_iters=2", "--ckpt_interval=2", "--sample_interval=100"), Dist())
    from fastgan import distrib
    monkeypatch.setattr(distrib, "gather_objects", lambda d, obj: [obj, 0])     # what rank 1 reports
    with pytest.raises(ck.CheckpointError, match=r"ranks disagree .* \(per rank: \[2, 0\]\)"):
        train(tiny(tmp_path, data_args, "--total_iters=4", "--ckpt_interval=2"), Dist())
    assert [n for n, _ in ck.list_checkpoints(tmp_path / "ckpt")] == [2]


def test_finished_run_with_a_config_that_no_longer_fits(tmp_path, data_args):
    """A finished run's generator loads like a resumed one's: a model that does not fit is one line
    naming the setting that would."""
    train(tiny(tmp_path, data_args, "--total_iters=1", "--ckpt_interval=1", "--sample_interval=100"), Dist())
    with pytest.raises(ck.CheckpointError, match=r"the generator does not fit the configured model .*"
                                                 r"it fits .*--model.base_channels=8"):
        train(tiny(tmp_path, data_args, "--total_iters=1", "--model.base_channels=4"), Dist())


@pytest.mark.parametrize("rank0_has_grid", [True, False])
def test_finish_follows_rank_0_about_the_last_grid(tmp_path, monkeypatch, rank0_has_grid):
    """Drawing the last grid is a collective, so every rank must agree to draw it: rank 1, which
    sees no grid (another node's view of the folder), follows what rank 0 saw."""
    from fastgan import distrib
    from fastgan import train as train_mod
    monkeypatch.setattr(distrib, "gather_objects", lambda d, obj: [rank0_has_grid, obj])
    drawn = []
    monkeypatch.setattr(train_mod.Run, "write_samples", lambda run, it: drawn.append(it))
    cfg = C.Config(work_dir=str(tmp_path), model=C.ModelConfig(resolution=32, base_channels=4))
    G, D = build(cfg.model)
    run = train_mod.Run(cfg, Dist(rank=1, world_size=2), None, G, D, G_out=G, noise_gen=torch.Generator(),
                        fixed_z=torch.zeros(1, 100))
    run.finish(5)
    assert drawn == ([] if rank0_has_grid else [5]) and not (tmp_path / "generator.safetensors").exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, data_args):
    work = tmp_path / "run"
    base = [ROOT / "configs" / "quickstart.py", f"--work_dir={work}", *data_args, "--sample_interval=100",
            "--ckpt_interval=2"]
    assert run_script(*base, "--total_iters=2").returncode == 0
    good = (work / "ckpt" / "iter_2.pt").read_bytes()
    out = run_script(*base, "--total_iters=8", "--optim.lr_d=inf")        # D's weights blow up at once
    assert out.returncode != 0
    # The resumed run trains with the new lr (not the checkpoint's) and says so.
    assert "settings from the config, not the checkpoint: lr_d 0.0002 -> inf" in out.stdout
    assert "loss is not finite at iteration <= 3" in out.stderr and "ckpt/iter_2.pt" in out.stderr
    assert [n for n, _ in ck.list_checkpoints(work / "ckpt")] == [2]
    assert (work / "ckpt" / "iter_2.pt").read_bytes() == good


def test_torchrun_two_processes(tmp_path, data_args):
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
           str(ROOT / "configs" / "quickstart.py"), f"--work_dir={work}", *data_args, "--total_iters=4",
           "--sample_interval=2", "--ckpt_interval=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("backend torch on cpu x2") == 1                  # rank 0 alone prints
    state = ck.load(work / "ckpt" / "iter_4.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])   # seeds offset by rank
    assert sorted(p.name for p in (work / "training_samples").iterdir()) == ["iter_2.png", "iter_4.png",
                                                                           "progress.gif", "real.png"]
    entries = [e for e in log_entries(work) if "loss_g" in e]
    assert [e["iter"] for e in entries] == [1, 2, 3, 4]                      # one writer
    assert all(torch.isfinite(t).all() for t in state["G"].values() if t.is_floating_point())


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_triton_backend_trains_on_cpu(tmp_path, data_args, deterministic):
    """backend=triton on a CPU runs the fused kernels through Triton's interpreter, which train.py
    switches on itself: the child gets no TRITON_INTERPRET (conftest sets it for this process).
    ~20 s each: 2 iterations at batch 2, base_channels 4 (the interpreter does ~0.3 GFLOP/s)."""
    small = [*data_args, "--model.base_channels=4", "--batch_size=2", "--total_iters=2", "--sample_interval=2",
             "--ckpt_interval=2", f"--seed={int(torch.randint(0, 1000, ()))}"]
    work = tmp_path / "triton"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = run_script(ROOT / "configs" / "quickstart.py", f"--work_dir={work}", *small, "--backend=triton",
                     f"--deterministic={str(deterministic).lower()}", env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backend triton on cpu x1" in out.stdout
    got = [(e["loss_d_fake"], e["loss_d_real"], e["loss_g"]) for e in log_entries(work) if "loss_g" in e]
    assert len(got) == 2 and all(0 < v < 100 for row in got for v in row)        # finite, not NaN
    # The same run on the torch backend: same math in fp32 (the interpreter's fp32 dot is IEEE),
    # so the losses agree up to float summation order; log.jsonl rounds them to 6 decimals.
    train(tiny(tmp_path / "torch", data_args, *small, "--backend=torch"), Dist())
    want = [(e["loss_d_fake"], e["loss_d_real"], e["loss_g"]) for e in log_entries(tmp_path / "torch") if "loss_g" in e]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=2e-6)
    # Its checkpoint loads into the torch backend, which redraws the triton run's final samples
    # (eval mode, running statistics) to within one 8-bit level.
    state = ck.load(work / "ckpt" / "iter_2.pt")
    cfg = C.from_dict(state["config"])
    G, _ = build(cfg.model, "torch")
    G.load_state_dict(state["G"])
    G.eval()
    z = G.sample_noise(cfg.num_samples, generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        redrawn = images.make_grid(G(z), nrow=2).astype(int)
    saved = np.asarray(Image.open(work / "training_samples" / "iter_2.png")).astype(int)
    assert saved.shape == redrawn.shape and np.abs(saved - redrawn).max() <= 1 and saved.std() > 0
    torch.testing.assert_close(ck.load_generator(work / "generator.safetensors").state_dict(), state["G"])


def test_command_line_help_and_errors(tmp_path):
    out = run_script("--help")
    assert out.returncode == 0 and "--model.base_channels=" in out.stdout and "--resume" in out.stdout
    out = run_script(ROOT / "configs" / "quickstart.py", "--modle.resolution=32", f"--work_dir={tmp_path}")
    assert out.returncode != 0 and "unknown config key 'modle.resolution'; valid keys:" in out.stderr
    out = run_script(ROOT / "configs" / "quickstart.py", f"--work_dir={tmp_path}", "--resume", tmp_path / "x.pt")
    assert out.returncode != 0 and "checkpoint not found" in out.stderr
    # Without fastgan importable (no site-packages) the script says how to install it.
    out = subprocess.run([sys.executable, "-S", TRAIN, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "pip install -e ." in out.stderr


def test_train_function_raises_training_error(tmp_path, data_args):
    cfg = tiny(tmp_path, data_args, "--total_iters=2", "--optim.lr_d=inf", "--ckpt_interval=100")
    with pytest.raises(TrainingError, match="No checkpoint was written"):
        train(cfg, Dist())
