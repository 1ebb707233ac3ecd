"""torchrun --nproc_per_node=2 on CPU (gloo): local rank 0 writes the synthetic faces and builds
the cache while rank 1 waits; each rank serves its shard; an error on the builder reaches both
ranks instead of leaving one hanging at a barrier (~8 s)."""

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch

from fastgan.config import load
from fastgan.data import build_loader

QUICKSTART = Path(__file__).resolve().parents[1] / "configs/quickstart.py"

SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from itertools import islice
from fastgan.config import load
from fastgan.data import DataError, build_loader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out, args = {}, json.loads(sys.argv[1])
logs = []
cfg = load(args["config"], args["good"])
loader = build_loader(cfg, rank, world, log=logs.append)
out["name"], out["num_images"] = loader.name, loader.num_images
out["sums"] = [b.double().sum().item() for b in islice(loader, 6)]
out["logs"] = logs
try:
    build_loader(load(args["config"], args["bad"]), rank, world, log=logs.append)
except DataError as e:
    out["error"] = str(e)
json.dump(out, open(os.path.join(args["out"], f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def test_two_ranks_share_one_build_and_one_error(tmp_path):
    good = [f"--data.root={tmp_path / 'syn'}", "--data.synthetic_count=96", "--batch_size=8",
            f"--data.cache_dir={tmp_path / 'cache'}", "--data.cache=host", "--data.loader=torch",
            "--data.num_workers=0", "--data.flip=true"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("<html>")
    bad = ["--data.source=folder", f"--data.root={tmp_path / 'bad'}", f"--data.cache_dir={tmp_path / 'cache'}"]
    args = json.dumps({"config": str(QUICKSTART), "good": good, "bad": bad, "out": str(tmp_path)})
    (tmp_path / "run.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "run.py"), args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_images"] for r in ranks] == [96, 96] and ranks[0]["name"] == "torch + host cache"
    assert sum("writing 96 synthetic faces" in line for line in ranks[0]["logs"]) == 1
    assert ranks[1]["logs"] == []                     # rank 1 neither wrote nor said anything
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    # each rank's batches are the ones a lone process with that rank computes from the same data
    cfg = load(QUICKSTART, good)
    for r in range(2):
        alone = [b.double().sum().item() for b in islice(build_loader(cfg, r, 2, log=lambda *a: None), 6)]
        assert ranks[r]["sums"] == alone
    assert ranks[0]["sums"] != ranks[1]["sums"]
    assert "no usable image" in ranks[0]["error"]
    assert "failed on another rank" in ranks[1]["error"] and "no usable image" in ranks[1]["error"]
    assert torch.tensor(ranks[0]["sums"]).isfinite().all()
