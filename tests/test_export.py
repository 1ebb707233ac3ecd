"""ONNX export: onnxruntime's output against torch's, at batch sizes other than the one traced,
for a fastgan checkpoint and, through export.py's command line, an MMGeneration file at another
opset; opsets out of range or that the exporter could not convert are refused (~30 s).

Tolerance: the same fp32 convolutions in another library, which may sum in another order:
differences of a few ulps of the pre-tanh activations; atol 1e-5 on outputs in [-1, 1].
"""


import onnx
import onnxruntime as ort
import pytest
import torch

import mmgen_layout as mm
from fastgan import checkpoint as ck
from fastgan.config import Config, ModelConfig, save, to_dict
from fastgan import export as export_mod
from fastgan.errors import UserError
from fastgan.export import export
from fastgan.export import main as export_main
from fastgan.models import build
from parity import fresh_seed


def run_onnx(path, z: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["images"], {"z": z.numpy()})[0])


def test_fastgan_checkpoint_exports(tmp_path):
    cfg = Config(model=ModelConfig(preset="pytorch_examples", resolution=32, channels=1, base_channels=8))
    torch.manual_seed(fresh_seed())
    G, D = build(cfg.model)
    G(torch.randn(16, 100))                       # running statistics away from their init
    ck.save({"iteration": 1, "G": G.state_dict(), "D": D.state_dict(), "opt_g": {}, "opt_d": {},
             "config": to_dict(cfg)}, tmp_path / "iter_1.pt")
    G = ck.load_generator(tmp_path / "iter_1.pt")
    out = export(G, tmp_path / "g.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["z"] and [o.name for o in model.graph.output] == ["images"]
    for n in (1, 7):
        z = torch.randn(n, 100)
        got = run_onnx(out, z)
        with torch.no_grad():
            want = G(z)                             # eval mode: BN from running statistics
        assert got.shape == (n, 1, 32, 32)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("tmp*"))    # one file, no leftovers


def test_mmgen_file_exports_from_the_command_line(tmp_path, capsys):
    """export.py's main, in process (a subprocess would pay torch's and the exporter's imports again)."""
    cfg = Config(model=ModelConfig(preset="mmgen", resolution=32, channels=3, base_channels=8))
    save(cfg, tmp_path / "config.json")
    model = mm.StaticUnconditionalGAN(scale=32, channels=3, g_base=32, d_base=8, ema="mmgen",
                                      seed=fresh_seed())
    mm.save(model, tmp_path / "mm.pth")
    out = tmp_path / "onnx" / "generator.onnx"
    assert export_main([str(tmp_path / "config.json"), str(tmp_path / "mm.pth"), "--out", str(out), "--raw",
                        "--opset", "17"]) == 0
    said = capsys.readouterr()
    assert f"wrote {out}" in said.out and "opset 17)" in said.out
    assert "onnxruntime vs torch on 3 noise vectors" in said.out
    assert export_mod.opset_of(onnx.load(str(out))) == 17
    assert "converted from MMGeneration's BGR to RGB" in said.out
    z = torch.randn(5, 100)
    with torch.no_grad():
        want = model.generator(z).flip(1)           # --raw: the trained generator, in RGB
    torch.testing.assert_close(run_onnx(out, z), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("opset", [5, export_mod.MIN_OPSET - 1, onnx.defs.onnx_opset_version() + 1, 99])
def test_an_opset_out_of_range_is_one_line(opset, capsys):
    with pytest.raises(SystemExit) as e:
        export_mod.parse_args(["config.json", "ckpt", "--opset", str(opset)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(f"--opset must be from {export_mod.MIN_OPSET} to "
                                                  f"{onnx.defs.onnx_opset_version()} (the newest the installed onnx "
                                                  f"knows), got {opset}")


def test_an_opset_the_exporter_did_not_reach_writes_nothing(tmp_path, monkeypatch):
    """The version converter, when it fails, keeps the opset it started from and only logs: export
    must say so and leave no file claiming another opset."""
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **kw: real(*a, **{**kw, "opset_version": 18}))
    G, _ = build(ModelConfig(preset="pytorch_examples", resolution=32, channels=1, base_channels=4))
    with pytest.raises(UserError, match="could not convert the generator to opset 17 \\(it made opset 18\\)"):
        export(G, tmp_path / "g.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []
