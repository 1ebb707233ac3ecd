"""The output side of bench/throughput.py: the markdown table, the speed targets, rows that
failed, and the JSON file (written atomically, so a killed run leaves its earlier rows readable).
No torch here: bench/gpu_summary.py uses it too."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastgan import files

COLUMNS = [("variant", "variant", "{}"), ("preset", "preset", "{}"), ("batch", "batch", "{}"), ("mode", "mode", "{}"),
           ("img_per_s", "img/s", "{:,.1f}"), ("img_per_s_min", "min", "{:,.1f}"), ("img_per_s_max", "max", "{:,.1f}"),
           ("ms_per_iter", "ms/iter", "{:.3f}"), ("mfu", "MFU", "{:.1%}"), ("speedup_vs_eager", "vs eager", "{:.2f}x"),
           ("parity_max_rel_err", "parity", "{:.1e}")]


def table(rows) -> str:
    lines = ["| " + " | ".join(head for _, head, _ in COLUMNS) + " | note |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        note = r.get("error") or r.get("parity_error") or r.get("note", "")
        lines.append("| " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def targets(rows) -> list[dict]:
    """The speed targets (MMGen preset, bf16; bench/NOTES.md, section 4, "Targets") where the needed rows exist."""
    def get(variant, batch, mode):
        return next((r for r in rows if r["variant"] == variant and r["preset"] == "mmgen" and r["batch"] == batch
                     and r["mode"] == mode and r.get("img_per_s")), None)
    out = []

    def check(what, value, goal, unit="x"):
        if value is not None:
            out.append({"target": what, "value": round(value, 3), "goal": goal, "met": value >= goal, "unit": unit})

    def ratio(a, b):
        return a["img_per_s"] / b["img_per_s"] if a and b else None

    for batch in sorted({r["batch"] for r in rows}):
        fast = get("fastgan", batch, "train")
        compiled = [get(v, batch, "train") for v in ("compile_max_autotune", "compile_reduce_overhead")]
        best = max((c for c in compiled if c), key=lambda c: c["img_per_s"], default=None)
        if batch == 128:
            check("train b128: fastgan / best torch.compile", ratio(fast, best), 2.0)
            check("train b128: fastgan / eager fp32", ratio(fast, get("eager_fp32", batch, "train")), 6.0)
        if batch == 1024:
            check("train b1024: fastgan MFU", fast["mfu"] if fast else None, 0.40, "fraction")
            sampled = [get(v, batch, "sample") for v in ("compile_max_autotune", "compile_reduce_overhead")]
            best_s = max((c for c in sampled if c), key=lambda c: c["img_per_s"], default=None)
            check("sample b1024: fastgan / best torch.compile", ratio(get("fastgan", batch, "sample"), best_s), 2.0)
    return out


def write_json(path: Path, data: dict) -> None:
    """A killed run leaves the old file or the new one, never half of one. Values JSON has no type
    for (a torch.device, a Path) are written as their str()."""
    files.write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def slug(text: str) -> str:
    """A device name as a file name: "NVIDIA H200" -> "nvidia-h200", "cpu (x86_64, 2 cores)" -> "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower().split("(")[0]).strip("-")


def key(row) -> tuple:
    return row["variant"], row["preset"], row["batch"], row["mode"]


def failed_row(variant, preset, batch, mode, flops, error: Exception) -> dict:
    row = {"variant": variant, "preset": preset, "batch": batch, "mode": mode, "flops_per_iter": flops,
           "gflop_per_img": flops / batch / 1e9, "error": f"{type(error).__name__}: {str(error).strip()[:400]}"}
    return row | dict.fromkeys(("img_per_s", "img_per_s_min", "img_per_s_max", "ms_per_iter", "mfu",
                                "speedup_vs_eager", "parity_max_rel_err"))
