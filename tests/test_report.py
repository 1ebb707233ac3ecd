"""What a run shows: report.html, training_samples/progress.gif and real.png (~10 s on 2 cores:
one tiny run of 4 iterations resumed to 6, plus unit checks of the GIF and the real-image grid)."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan import animation, images, report
from fastgan import config as C
from fastgan.data import build_loader
from fastgan.distrib import Dist
from fastgan.train import train
from parity import fresh_seed
from runs import ROOT, tiny, tiny_args

SECTIONS = ("run", "samples", "losses", "progress", "speed", "eval", "checkpoints")


def run_cfg(work, data, seed, *extra) -> C.Config:
    """A tiny run with 9-image grids every 2 iterations and a checkpoint every 3."""
    return tiny(work, tiny_args(data, "--num_samples=9", "--sample_interval=2", "--ckpt_interval=3", f"--seed={seed}"),
                *extra)


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")).astype(int))
    return out


def inlined_images(page: str) -> list[Image.Image]:
    """Every src/href must be a data URI; returns the decoded images."""
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/") for r in refs), [r[:40] for r in refs]
    decoded = []
    for ref in refs:
        im = Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1], validate=True)))
        im.load()
        decoded.append(im)
    return decoded


def test_run_writes_report_progress_gif_and_real_grid(tmp_path):
    work, seed = tmp_path / "run", int(torch.randint(0, 1000, ()))
    train(run_cfg(work, tmp_path, seed, "--total_iters=4"), Dist())
    (work / "training_samples" / "progress.gif").unlink()     # as if lost: the resumed run rebuilds it
    says = []
    cfg = run_cfg(work, tmp_path, seed, "--total_iters=6")
    train(cfg, Dist())
    samples = work / "training_samples"

    # real.png: the first 9 images (batches of 8: the first two batches), exactly as the loader
    # serves them from iteration 0.
    batches = iter(build_loader(cfg, log=says.append))
    first = torch.cat([next(batches), next(batches)])[:9]
    assert np.array_equal(np.asarray(Image.open(samples / "real.png")), images.make_grid(first, nrow=3))

    # progress.gif: one frame per grid (2, 4 from the first run, 6 after the resume), in order.
    grids = [np.asarray(Image.open(samples / f"iter_{i}.png")).astype(int) for i in (2, 4, 6)]
    frames = gif_frames(samples / "progress.gif")
    assert len(frames) == 3
    h, w, _ = grids[0].shape
    for i, (frame, grid) in enumerate(zip(frames, grids)):
        assert frame.shape == (h + animation.CAPTION_PX, w, 3)
        assert np.abs(frame[:h] - grid).mean() < 4, f"frame {i}"     # 256-colour GIF: ~1-2 levels here

    # log.jsonl: where the run ran, and D's outputs with the losses.
    entries = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    starts = [e for e in entries if e.get("event") == "start"]
    assert [s["start_iter"] for s in starts] == [0, 4]
    assert starts[0]["device"] == "cpu" and starts[0]["backend"] == "torch" and starts[0]["amp"] == "fp32"
    assert all(0 < e[k] < 1 for e in entries if "loss_g" in e for k in ("d_real", "d_fake", "d_fake_g"))

    # report.html, as train.py left it, and again with evaluation entries in the log.
    page = (work / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "http://" not in page and "https://" not in page
    shown = inlined_images(page)
    assert [im.format for im in shown] == ["PNG", "PNG", "PNG", "PNG", "GIF", "PNG"]   # grid, real, 2 plots, gif, img/s
    assert shown[4].n_frames == 3
    assert "6 of 6 (100%)" in page and "cpu x1" in page and "ckpt/iter_3.pt" in page
    assert "No evaluation in this run" in page

    swd = torch.rand(4).tolist()
    with open(work / "log.jsonl", "a") as f:
        for it, v in zip((2, 3, 4, 6), swd):
            f.write(json.dumps({"iter": it, "eval/swd": v, "eval/is": 2 * v, "time": 0}) + "\n")
    report.write(work)
    page = (work / "report.html").read_text()
    best = min(range(4), key=lambda i: swd[i])
    row = re.search(r"<tr><th>swd \(ckpt/best.pt follows it\)</th>(.*?)</tr>", page).group(1)
    assert f"<td>{swd[best]:.6g}</td><td class=num>{(2, 3, 4, 6)[best]}</td><td>lower</td>" in row
    assert re.search(r"<tr><th>is</th>.*?<td>higher</td>", page)
    assert len(inlined_images(page)) == 7                       # + the metrics panel


def test_report_errors(tmp_path):
    says = []
    assert report.write_quietly(tmp_path, says.append) is None
    assert len(says) == 1 and says[0].startswith("warning: report.html not written") and "no config.json" in says[0]
    assert not (tmp_path / "report.html").exists()
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(ROOT / "fastgan" / "report.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


def test_progress_gif_orders_grids_by_iteration(tmp_path, monkeypatch):
    """iter_10 after iter_9 (not by name); past MAX_FRAMES, evenly spaced with first and last kept."""
    rng = np.random.default_rng(fresh_seed())
    iters = [100, 9, 10, 2, 1000]
    for it in iters:       # distinct flat colours: each frame's nearest grid is unambiguous
        Image.fromarray(np.full((20, 30, 3), rng.integers(0, 256, 3), np.uint8)).save(tmp_path / f"iter_{it}.png")
    (tmp_path / "real.png").write_bytes((tmp_path / "iter_9.png").read_bytes())   # not a progress grid
    want = sorted(iters)

    def order(path):
        colours = {it: np.asarray(Image.open(tmp_path / f"iter_{it}.png"))[0, 0].astype(int) for it in iters}
        return [min(colours, key=lambda it: np.abs(f[:20] - colours[it]).sum()) for f in gif_frames(path)]

    assert order(animation.write_progress_gif(tmp_path)) == want
    monkeypatch.setattr(animation, "MAX_FRAMES", 3)
    assert order(animation.write_progress_gif(tmp_path)) == [want[0], want[2], want[4]]
    assert animation.write_progress_gif(tmp_path / "empty") is None


def test_progress_gif_rebuild_quantizes_only_the_new_grid(tmp_path, monkeypatch):
    """Frames made before are kept as palette images and go into the GIF as they are."""
    rng = np.random.default_rng(fresh_seed())
    for it in (1, 2, 3):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(tmp_path / f"iter_{it}.png")
    animation.write_progress_gif(tmp_path)
    quantized = []
    real = Image.Image.quantize
    monkeypatch.setattr(Image.Image, "quantize",
                        lambda im, *a, **kw: (quantized.append(im.size), real(im, *a, **kw))[1])
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(tmp_path / "iter_4.png")
    frames = gif_frames(animation.write_progress_gif(tmp_path))
    assert len(frames) == 4 and quantized == [(30, 20 + animation.CAPTION_PX)] * 2   # its palette, then the mapping
    quantized.clear()
    animation.write_progress_gif(tmp_path)
    assert quantized == []


@pytest.mark.parametrize("channels", [1, 3])
def test_real_grid_collects_across_batches(tmp_path, channels):
    batches = [torch.rand(4, channels, 8, 8) * 2 - 1 for _ in range(4)]
    want = images.make_grid(torch.cat(batches)[:10], nrow=5)
    grid = images.RealGrid(tmp_path / "real.png", num=10, nrow=5)
    for b in batches:
        grid.add(b)
        b.fill_(0)            # a loader reusing its buffer must not change what was taken
    assert grid.done
    assert np.array_equal(np.asarray(Image.open(tmp_path / "real.png")).reshape(want.shape), want)
    # A second run finds real.png and leaves it alone; a short run writes what it saw at close().
    before = (tmp_path / "real.png").read_bytes()
    again = images.RealGrid(tmp_path / "real.png", num=10, nrow=5)
    again.add(torch.zeros(4, channels, 8, 8))
    again.close()
    assert (tmp_path / "real.png").read_bytes() == before
    short = images.RealGrid(tmp_path / "short.png", num=10, nrow=5)
    short.add(torch.ones(3, channels, 8, 8))
    short.close()
    assert np.asarray(Image.open(tmp_path / "short.png")).shape[:2] == (12, 3 * 10 + 2)


def test_log_history_after_a_resume_from_an_earlier_checkpoint():
    """Killed at iteration 5 after a checkpoint at 3: the resumed run's lines replace 4 and 5."""
    log = [{"iter": i, "elapsed_s": i, "run": 1} for i in (1, 2, 3, 4, 5)]
    log += [{"iter": i, "elapsed_s": i - 3, "run": 2} for i in (4, 5, 6)]
    assert [(e["iter"], e["run"]) for e in report.history(log)] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert [len(s) for s in report.segments(log)] == [5, 3]
