"""MMGeneration / MMagic checkpoints in, and fastgan checkpoints from before the rename (~25 s).

A hand-written MMGeneration DCGAN (tests/mmgen_layout.py: mmcv naming, BGR) is saved in each layout
its frameworks write; G and D loaded from those files reproduce its outputs, converted to RGB.
Tolerances: G's output channels are a permutation of the same sums, so they match exactly; D's
first conv sums its three input channels in another order, so D's logits match to fp32 rounding
(rtol 1e-5, atol 1e-5 on logits of order 1 after five layers of 16-1024-term sums).
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmgen_layout as mm
from fastgan import checkpoint as ck
from fastgan import config as C
from fastgan import images
from fastgan.distrib import Dist
from fastgan.train import train
from parity import fresh_seed
from runs import tiny, tiny_args

ROOT = Path(__file__).resolve().parents[1]
CELEBA_CONFIG = ROOT / "configs" / "dcgan" / "dcgan_celeba-cropped_64_b128x1_300k.py"
RELEASED = "dcgan_celeba-cropped_64_b128x1_300kiter_20210408_161607-1f8a2277.pth"   # OpenMMLab's file name


def small_cfg(channels=3) -> C.Config:
    """fastgan's config for MMGen at 32 px with G base 32 (last hidden width 8) and D base 8."""
    return C.Config(model=C.ModelConfig(preset="mmgen", resolution=32, channels=channels, base_channels=8))


def small_model(ema=None, channels=3) -> mm.StaticUnconditionalGAN:
    return mm.StaticUnconditionalGAN(scale=32, channels=channels, g_base=32, d_base=8, ema=ema,
                                     seed=fresh_seed())


def assert_rgb_of(G, D, mm_G, mm_D, channels=3):
    z = torch.randn(5, 100)
    x = torch.rand(5, channels, 32, 32) * 2 - 1
    with torch.no_grad():
        want = mm_G(z).flip(1)                          # MMGen draws BGR
        assert torch.equal(G(z), want)
        torch.testing.assert_close(D(x), mm_D(x.flip(1)), rtol=1e-5, atol=1e-5)   # MMGen's D reads BGR


@pytest.mark.parametrize("layout, ddp, ema", [("mmcv", False, None), ("mmcv", True, "mmgen"),
                                              ("mmengine", False, None), ("mmengine", True, "mmagic")])
def test_layouts_load_as_rgb(tmp_path, layout, ddp, ema):
    model = small_model(ema)
    path = tmp_path / "model.pth"
    mm.save(model, path, layout, ddp=ddp)
    notes = []
    G = ck.load_generator(path, small_cfg(), log=notes.append)
    D = ck.load_discriminator(path, small_cfg())
    assert not G.training and not D.training
    assert_rgb_of(G, D, model.ema_generator() if ema else model.generator, model.discriminator)
    assert any("converted from MMGeneration's BGR to RGB" in n for n in notes)
    assert any(("the EMA generator" if ema else "the generator") in n for n in notes)
    if ema:      # --raw: the trained generator
        raw = ck.load_generator(path, small_cfg(), raw=True)
        assert torch.equal(raw(torch.zeros(1, 100)), model.generator(torch.zeros(1, 100)).flip(1))


def test_one_channel_is_not_flipped(tmp_path):
    model = small_model(channels=1)
    mm.save(model, tmp_path / "mnist.pth")
    notes = []
    G = ck.load_generator(tmp_path / "mnist.pth", small_cfg(channels=1), log=notes.append)
    D = ck.load_discriminator(tmp_path / "mnist.pth", small_cfg(channels=1))
    assert torch.equal(G.output_layer.conv.weight, model.generator.output_layer.conv.weight)
    assert torch.equal(D.downsamples[0].conv.weight, model.discriminator.downsamples[0].conv.weight)
    assert any("one-channel model, no BGR -> RGB conversion" in n for n in notes)


def test_released_file_samples_in_rgb(tmp_path):
    """The released CelebA file's layout at its real size, through sample.py as a user runs it."""
    model = mm.StaticUnconditionalGAN(seed=fresh_seed())
    mm.save(model, tmp_path / RELEASED)
    out = subprocess.run([sys.executable, str(ROOT / "fastgan" / "sample.py"), str(CELEBA_CONFIG), RELEASED,
                          "--num-samples", "4", "--seed", "7", "--out", "grid.png", "--each", "each"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "generator, discriminator converted from MMGeneration's BGR to RGB" in out.stdout
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(7))       # sample.py's noise
    with torch.no_grad():
        want = images.to_uint8(model.generator(z).flip(1))
    got = np.stack([np.asarray(Image.open(tmp_path / "each" / f"{i:06d}.png")) for i in range(4)])
    assert got.shape == (4, 64, 64, 3) and np.array_equal(got, want)


def test_files_that_need_code_are_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    torch.save({"state_dict": {"generator.x": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(ck.CheckpointError, match=r"refusing .*evil.pth: it holds a reference to"):
        ck.load_generator(tmp_path / "evil.pth", small_cfg())
    assert not marker.exists()
    # An unknown class inside the weights: the stand-in is found and the file refused.
    model = small_model()
    sd = model.state_dict()
    with mm.fake_mmengine() as HistoryBuffer:
        sd["generator.output_layer.conv.bias"] = HistoryBuffer()        # an object where a tensor belongs
        torch.save({"meta": {}, "state_dict": sd}, tmp_path / "odd.pth")
    with pytest.raises(ck.CheckpointError, match="refusing .*generator weights hold Python objects"):
        ck.load_generator(tmp_path / "odd.pth", small_cfg())
    # On the command line: one line, and never torch's advice to load with weights_only=False.
    out = subprocess.run([sys.executable, str(ROOT / "fastgan" / "sample.py"), str(ROOT / "configs" / "quickstart.py"),
                          str(tmp_path / "evil.pth"), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "weights_only" not in out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: refusing")
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_mismatch_names_the_key_and_the_config_that_fits(tmp_path):
    mm.save(small_model(), tmp_path / "small.pth")
    wide = small_cfg()
    wide.model.base_channels = 16
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_generator(tmp_path / "small.pth", wide)
    msg = str(err.value)
    assert "\n" not in msg and "does not fit the configured model" in msg
    assert "noise2feat.conv.weight is [100, 32, 4, 4] in the checkpoint, [100, 64, 4, 4] in the model" in msg
    assert msg.endswith("it fits --model.preset=mmgen --model.resolution=32 --model.channels=3 "
                        "--model.base_channels=8")
    with pytest.raises(ck.CheckpointError, match=r"downsamples.0.conv.weight is \[8, 3, 4, 4\] .* \[8, 1, 4, 4\]"):
        ck.load_discriminator(tmp_path / "small.pth", small_cfg(channels=1))
    with pytest.raises(ck.CheckpointError, match="is an MMGeneration/MMagic checkpoint; start a new run from its "
                                                 "weights with --init_from="):
        ck.load(tmp_path / "small.pth")


def _old_names(sd: dict) -> dict:
    """fastgan's parameter names before they became MMGeneration's."""
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head == "downsamples":
            i, _, rest = rest.partition(".")
            k = f"img2feat.{rest}" if i == "0" else f"downsampling.{int(i) - 1}.{rest}"
        elif head == "output_layer":
            k = f"{'to_rgb' if 'noise2feat.conv.weight' in sd else 'decision'}.{rest}"
        out[k] = v
    return out


def test_checkpoints_from_before_the_rename_load(tmp_path):
    cfg = small_cfg()
    from fastgan.models import build
    G, D = build(cfg.model)
    old = {"iteration": 4, "G": _old_names(G.state_dict()), "D": _old_names(D.state_dict()),
           "opt_g": {}, "opt_d": {}, "config": C.to_dict(cfg)}
    assert "to_rgb.conv.bias" in old["G"] and "img2feat.conv.bias" in old["D"]
    assert "downsampling.1.bn.weight" in old["D"] and "decision.conv.bias" in old["D"]
    ck.save(old, tmp_path / "ckpt" / "iter_4.pt")
    state = ck.load(tmp_path / "ckpt" / "iter_4.pt")          # what a resume reads
    assert state["G"].keys() == G.state_dict().keys() and state["D"].keys() == D.state_dict().keys()
    z = torch.randn(3, 100)
    G.eval()
    assert torch.equal(ck.load_generator(tmp_path / "ckpt" / "iter_4.pt")(z), G(z))
    D_loaded = ck.load_discriminator(tmp_path / "ckpt" / "iter_4.pt")
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in D_loaded.state_dict().items())
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in old["G"].items()}, str(tmp_path / "generator.safetensors"),
              metadata={"format": "fastgan-generator", "config": C.dumps(cfg)})
    assert torch.equal(ck.load_generator(tmp_path / "generator.safetensors")(z), G(z))


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return tiny_args(tmp_path_factory.mktemp("data"), "--data.synthetic_count=32", "--sample_interval=100",
                     "--ckpt_interval=100")


def test_init_from_mmgen_then_resume_wins(tmp_path, data_args, capsys):
    """init_from: the file's G and D (RGB), fresh optimizers, iteration 0. With lr 0 the parameters
    stay the imported ones exactly (Adam adds 0 * update), so the checkpoint shows what was loaded."""
    model = small_model()
    mm.save(model, tmp_path / "mm.pth", "mmengine")
    work = tmp_path / "run"
    args = ["--optim.lr_g=0", "--optim.lr_d=0", f"--init_from={tmp_path / 'mm.pth'}"]
    train(tiny(work, data_args, *args, "--total_iters=2"), Dist())
    said = capsys.readouterr().out
    assert f"G and D initialised from {tmp_path / 'mm.pth'} (MMGeneration/MMagic checkpoint (mmengine layout))" in said
    assert "converted from MMGeneration's BGR to RGB" in said
    state = ck.load(work / "ckpt" / "iter_2.pt")
    assert state["config"]["init_from"] == str(tmp_path / "mm.pth")
    flips = {"output_layer.conv.weight": 1, "output_layer.conv.bias": 0}      # BGR -> RGB, by hand
    d_flips = {"downsamples.0.conv.weight": 1}
    for net, mm_net, flip in (("G", model.generator, flips), ("D", model.discriminator, d_flips)):
        for k, p in mm_net.named_parameters():
            want = p.detach().flip(flip[k]) if k in flip else p.detach()
            assert torch.equal(state[net][k], want), f"{net}.{k}"
    assert all(int(s["step"]) == 2 for s in state["opt_g"]["state"].values())      # fresh Adam, 2 steps
    # The same work_dir again: it resumes, and says init_from is ignored.
    train(tiny(work, data_args, *args, "--total_iters=3"), Dist())
    said = capsys.readouterr().out
    assert f"init_from={tmp_path / 'mm.pth'} ignored: resuming from {work / 'ckpt' / 'iter_2.pt'}" in said
    assert ck.load(work / "ckpt" / "iter_3.pt")["iteration"] == 3


def test_init_from_fastgan_checkpoint(tmp_path, data_args):
    first = tmp_path / "first"
    train(tiny(first, data_args, "--total_iters=2"), Dist())
    src = ck.load(first / "ckpt" / "iter_2.pt")
    second = tmp_path / "second"
    train(tiny(second, data_args, "--total_iters=1", "--optim.lr_g=0", "--optim.lr_d=0", f"--init_from={first}"),
          Dist())
    got = ck.load(second / "ckpt" / "iter_1.pt")
    assert got["iteration"] == 1
    for net in ("G", "D"):
        for k in src[net]:
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(got[net][k], src[net][k]), f"{net}.{k}"


def test_evaluate_reads_mmgen_files(tmp_path):
    """evaluate.py scores an MMGen file exactly as the same weights saved by fastgan."""
    from fastgan import evaluate as ev
    model = small_model()
    mm.save(model, tmp_path / "mm.pth")
    cfg = small_cfg()
    cfg.data = C.DataConfig(source="synthetic", root=str(tmp_path / "synth"), synthetic_count=16,
                            cache_dir=str(tmp_path / "cache"), loader="torch", num_workers=0)
    G = ck.load_generator(tmp_path / "mm.pth", cfg)
    torch.save(G.state_dict(), tmp_path / "g.pt")
    kw = dict(metrics="swd", num_samples=16, batch_size=8)
    a = ev.evaluate(cfg, str(tmp_path / "mm.pth"), torch.device("cpu"), **kw)
    b = ev.evaluate(cfg, str(tmp_path / "g.pt"), torch.device("cpu"), **kw)
    assert a == b and a["swd"] > 0


def test_mmgen_configs():
    """The other MMGen DCGAN recipes, and that each takes its released file's layout."""
    from fastgan.models import build
    mnist = C.load(ROOT / "configs/dcgan/dcgan_mnist-64_b128x1_Glr4e-4_Dlr1e-4_5k.py")
    lsun = C.load(ROOT / "configs/dcgan/dcgan_lsun-bedroom_64_b128x1_5e.py")
    assert (mnist.total_iters, mnist.batch_size, mnist.optim.lr_g, mnist.optim.lr_d) == (5000, 128, 4e-4, 1e-4)
    assert (mnist.model.channels, mnist.data.source, mnist.ckpt_interval, mnist.sample_interval) == (1, "idx", 500, 100)
    assert lsun.total_iters == 5 * math.ceil(3_033_042 / 128) and lsun.optim.lr_g == lsun.optim.lr_d == 2e-4
    for cfg in (mnist, lsun):
        assert (cfg.model.preset, cfg.model.resolution, cfg.recipe, cfg.ema.enabled) == ("mmgen", 64, "mmgen", False)
    # MNIST's released layout (64x64x1) is this config's model; 64x64x3 is test_models' MMGen check.
    G, D = build(mnist.model)
    for mine, theirs in ((G, mm.DCGANGenerator(64, 1)), (D, mm.DCGANDiscriminator(64, 1))):
        shapes = lambda net: {k: v.shape for k, v in net.state_dict().items()}     # noqa: E731
        assert shapes(mine) == shapes(theirs)
