"""bench/gpu_check.py's results: read what each step wrote, copy what the session commits into $OUT,
and write the summary (summary.json, summary.md) and the logs (logs.tar.gz) after every step.

$OUT, 7 files (the device tool brings back at most 8): summary.json, summary.md, the throughput table
as bench/results names it (<device>-<date>.json), samples-triton.png, samples-torch.png, profile.txt,
logs.tar.gz (every step's log, the JSON each stage wrote, pytest's junit XML, the training logs).
"""

from __future__ import annotations

import json
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from report import slug        # bench/report.py (bench/ is on sys.path: gpu_check.py puts it there)

# bench/gpu_check.sh installs fastgan before anything imports this; none of these imports torch
from fastgan import files
from fastgan.animation import list_grids
from fastgan.report import read_log


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# per stage

def collect(summary: dict, key: str, work: Path, out: Path) -> None:
    """Fold what stage `key` has written so far into summary (and copy its files to out)."""
    if key == "a":
        summary["env"] = _read(work / "env.json") or summary.get("env")
        summary["device"] = (summary["env"] or {}).get("device")
        summary["triton_cache"] = _read(work / "cache.json")
    elif key == "b":
        summary["correct"] = _read(work / "correct.json")
        summary["pytest"] = _junit(work / "b-pytest.xml")
    elif key in ("c", "e"):
        table = _read(work / "throughput.json")
        if table:
            name = f"{slug(table['device'])}-{table['date']}.json"
            files.copy(work / "throughput.json", out / name)
            summary["throughput"] = {"file": name, "peak_tflops": table.get("peak_tflops"),
                                     "rows": [_row(r) for r in table["rows"]], "targets": table.get("targets", [])}
        if key == "e":
            prof = _read(work / "profile.json")
            if prof:
                files.write_text(out / "profile.txt", f"{prof['device']}: one replay of the MMGen bf16 step at "
                                 f"batch 128 (captured: {prof['captured']})\n\n{prof['table']}\n")
                summary["profile"] = {"total_us": prof["total_us"], "top": prof["kernels"][:5]}
    elif key == "d":
        summary["learn"] = {b: _learned(work / f"d-{b}", work / "logs" / f"d-{b}.log", out / f"samples-{b}.png")
                            for b in ("triton", "torch")}
    summary["triton_stats"] = _triton_stats(work)


def _row(r: dict) -> dict:
    keep = ("variant", "batch", "mode", "ms_per_iter", "img_per_s", "speedup_vs_eager", "mfu", "parity_max_rel_err",
            "parity_bound", "parity_ok", "first_call_s", "kernels_per_iter", "error", "parity_error")
    return {k: r.get(k) for k in keep if r.get(k) is not None}


def _junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = root.iter("testcase")
    out = {"passed": 0, "failed": [], "skipped": 0}
    for c in cases:
        name = f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}"
        if c.find("failure") is not None or c.find("error") is not None:
            out["failed"].append(name)
        elif c.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def _learned(run: Path, log: Path, grid: Path) -> dict | None:
    """img/s (median of the log intervals after the first, which holds the warm-up and capture),
    the final SWD, the self-check's line, and the last sample grid copied to `grid`. A log line
    cut short (a step killed mid-write, or read while being written) is skipped."""
    entries = read_log(run / "log.jsonl")
    if not entries and not log.is_file():
        return None
    speeds = [e["img_per_s"] for e in entries if "img_per_s" in e]
    steady = sorted(speeds[1:] or speeds)
    evals = [e for e in entries if any(k.startswith("eval/") for k in e)]
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
    grids = list_grids(run / "training_samples")
    if grids:
        files.copy(grids[-1][1], grid)
    return {"iterations": max((e.get("iter", 0) for e in entries), default=0),
            "img_per_s": steady[len(steady) // 2] if steady else None,
            "elapsed_s": max((e.get("elapsed_s", 0) for e in entries), default=None),
            "losses": {k: v for k, v in next((e for e in reversed(entries) if "loss_d" in e), {}).items()
                       if k.startswith("loss")},
            "eval": {k[5:]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")},
            "self_check": next((ln for ln in lines if "self-check" in ln), None),
            "backend": next((ln for ln in lines if ln.startswith("backend ")), None),
            "step": next((ln for ln in lines if ln.startswith("step: ")), None),
            "error": next((ln for ln in reversed(lines) if ln.startswith("error:") or "Error" in ln[:40]), None),
            "grid": grid.name if grids else None}


def _triton_stats(work: Path) -> dict:
    """Each step's line of triton-stats.jsonl; one cut short or incomplete is skipped, not the rest."""
    per = {}
    for s in read_log(work / "triton-stats.jsonl"):
        try:
            per[s["tag"]] = {k: s[k] for k in ("hits", "compiled", "compile_s", "other")}
            if s["compiled_names"]:
                per[s["tag"]]["compiled_names"] = sorted(set(s["compiled_names"]))[:10]
        except (KeyError, TypeError):
            continue
    return per


# ---------------------------------------------------------------------------------------------
# summary

def _fmt(x, spec="{:.3g}"):
    return "-" if x is None else spec.format(x)


def _env_line(summary: dict) -> str:
    e = summary.get("env") or {}
    return (f"{e.get('device')}, {e.get('sms', '-')} SMs, sm {e.get('capability', '-')}, "
            f"driver {e.get('driver', '-')}; torch {e.get('torch')}, triton {e.get('triton')}; "
            f"bf16 peak {_fmt(e.get('peak_bf16_tflops'))} TFLOP/s, copy {_fmt(e.get('copy_gb_s'))} GB/s")


def _correct_line(summary: dict) -> str:
    c, t = summary.get("correct") or {}, summary.get("pytest")
    cases = c.get("cases", [])
    bad = [f"FAILED {x['preset']} {x['mode']}: {x['why']}" for x in cases if not x["ok"]]
    measured = [x for x in cases if "grads" in x]
    line = f"self-check {len(cases) - len(bad)}/{len(cases)} ok"
    if measured:
        w = max(measured, key=lambda x: x["grads"]["err"] / x["grads"]["bound"])
        line += f" (closest to its bound: {w['preset']} {w['mode']} grads {w['grads']['err']:.2g} " \
                f"of {w['grads']['bound']:.2g})"
    parts = [line, *bad]
    g = c.get("graph_vs_eager")
    if g:
        parts.append(f"graph vs eager {'ok' if g.get('ok') else 'FAILED'} ({_fmt(g.get('max_loss_diff'))} <= "
                     f"{g.get('bound')}, captured {g.get('captured')})")
    if t:
        parts.append(f"pytest {t['passed']} passed, {len(t['failed'])} failed, {t['skipped']} skipped"
                     + (f": {', '.join(t['failed'][:4])}" if t["failed"] else ""))
    return "; ".join(parts)


def _throughput_line(summary: dict, key: str) -> str:
    table = summary.get("throughput") or {}
    rows = table.get("rows", [])
    line = f"{len(rows)} rows in {table.get('file', '-')}"
    fast = next((r for r in rows if (r["variant"], r["batch"], r["mode"]) == ("fastgan", 128, "train")
                 and r.get("ms_per_iter")), None)
    if key == "c" and fast:
        line += (f"; fastgan train b128 {fast['ms_per_iter']:.2f} ms/iter, {fast['img_per_s']:,.0f} img/s, "
                 f"{_fmt(fast.get('speedup_vs_eager'), '{:.2f}')}x eager fp32")
    prof = summary.get("profile")
    if key == "e" and prof:
        top = ", ".join(f"{k['name'][:40]} {k['us'] / 1e3:.2f} ms" for k in prof["top"][:2])
        line = f"replay {prof['total_us'] / 1e3:.2f} ms of kernels; top: {top}; {line}"
    return line


def _learn_line(summary: dict) -> str:
    parts = []
    for b, r in (summary.get("learn") or {}).items():
        if r:
            parts.append(f"{b}: {_fmt(r['img_per_s'], '{:,.0f}')} img/s, SWD {_fmt(r['eval'].get('swd'), '{:.2f}')}"
                         f" after {r['iterations']} it" + (f" ({r['error'][:80]})" if r.get("error") else ""))
    return "; ".join(parts)


def _stage_line(key: str, summary: dict) -> str:
    if key == "a":
        return _env_line(summary)
    if key == "b":
        return _correct_line(summary)
    if key == "d":
        return _learn_line(summary)
    return _throughput_line(summary, key)


def markdown(summary: dict) -> str:
    dry = " (DRY RUN: toy sizes on the CPU)" if summary["dry_run"] else ""
    lines = [f"## fastgan GPU check: {summary.get('device')}, {summary['started']}{dry}",
             f"{summary.get('elapsed_s', '-')} s of a {summary['budget_s']:.0f} s budget "
             f"({summary['setup_s']} s set-up)",
             "", "| stage | status | planned s | used s | result |", "|---|---|---|---|---|"]
    for key, st in summary["stages"].items():
        steps = st["steps"]
        status = ", ".join(f"{n}: {s['status']}" for n, s in steps.items() if s["status"] != "ok") or "ok"
        used = sum(s.get("seconds", 0) for s in steps.values())
        lines.append(f"| {key} {st['title']} | {status} | {st['planned_s']:.0f} | {used:.0f} | "
                     f"{_stage_line(key, summary)} |")
    cache, stats = summary.get("triton_cache") or {}, summary.get("triton_stats") or {}
    hits, compiled = sum(s["hits"] for s in stats.values()), sum(s["compiled"] for s in stats.values())
    secs, other = sum(s["compile_s"] for s in stats.values()), sum(s["other"] for s in stats.values())
    carried = (f"{cache.get('kernels')} carried ({cache.get('size_mib')} MiB), key inputs "
               + ("as built" if not cache.get("differ") else "DIFFER: " + ", ".join(cache["differ"]))
               if cache.get("carried") else (cache.get("why") or "not prepared"))
    lines.append(f"| Triton cache | | | | {carried}; fastgan kernels: {hits} from the cache, {compiled} compiled "
                 f"({secs:.0f} s); {other} other kernels compiled in-process |")
    rows = (summary.get("throughput") or {}).get("rows", [])
    if rows:
        lines += ["", "| variant | batch | mode | ms/iter | img/s | vs eager fp32 | parity (bound) | first call s "
                      "| note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = (r.get("error") or r.get("parity_error") or "")[:80].replace("|", "/")
            lines.append(f"| {r['variant']} | {r['batch']} | {r['mode']} | {_fmt(r.get('ms_per_iter'), '{:.3f}')} | "
                         f"{_fmt(r.get('img_per_s'), '{:,.0f}')} | {_fmt(r.get('speedup_vs_eager'), '{:.2f}')} | "
                         f"{_fmt(r.get('parity_max_rel_err'), '{:.1e}')} ({_fmt(r.get('parity_bound'), '{:.0e}')}) | "
                         f"{_fmt(r.get('first_call_s'), '{:.0f}')} | {note} |")
        for g in (summary.get("throughput") or {}).get("targets", []):
            lines.append(f"- {'met' if g['met'] else 'MISSED'}: {g['target']} {g['value']} (goal >= {g['goal']})")
    return "\n".join(lines) + "\n"


def finish(summary: dict, work: Path, out: Path) -> str:
    """summary.json, summary.md and logs.tar.gz into out (each replaced whole); the markdown."""
    text = markdown(summary)
    files.write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    files.write_text(out / "summary.md", text)
    with files.atomic(out / "logs.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.glob("*.json")) + sorted(work.glob("*.jsonl")) + sorted(work.glob("*.xml")) \
                + sorted((work / "logs").glob("*.log")):
            tar.add(path, arcname=path.relative_to(work))
        for run in ("d-triton", "d-torch"):
            for name in ("log.jsonl", "config.json"):
                if (work / run / name).is_file():
                    tar.add(work / run / name, arcname=f"{run}/{name}")
    return text
