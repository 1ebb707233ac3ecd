"""Write WORK_DIR/report.html: a training run on one page that opens offline in any browser.

    python fastgan/report.py WORK_DIR [--out PATH]

train.py writes it too (rank 0), at every checkpoint and at the end. Everything is read from the
work dir: config.json, log.jsonl, training_samples/ (the newest grid, real.png, progress.gif), ckpt/.
The page holds the run (config, device, backend, amp, img/s, iterations done, elapsed, ETA), the
losses and D's outputs, img/s and the evaluation metrics over iterations (matplotlib, PNG), the
newest grid beside the real images, the progress animation and the checkpoints. Images and plots
are inlined as base64 data URIs and the style sheet is in the page: it fetches nothing.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]      # run as a file: fastgan/ must not shadow other modules

try:
    import fastgan  # noqa: F401
except ImportError:
    sys.exit("fastgan is not installed: run `pip install -e .` in the repository root")

import argparse
import base64
import html
import io
import json
import statistics
import time
from pathlib import Path

from fastgan import errors, files
from fastgan.animation import list_grids

SHOWN_PX = 560          # small grids are shown scaled up by whole factors to at most this width
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 16px 24px; color: #1f2328; background: #fff; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 17px; margin: 22px 0 8px; border-bottom: 1px solid #d0d7de; }
.sub { color: #57606a; margin: 0 0 8px; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 13px; color: #57606a; margin-top: 4px; }
table { border-collapse: collapse; font-size: 14px; } td, th { padding: 3px 12px 3px 0; text-align: left; }
th { color: #57606a; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { font-size: 12px; background: #f6f8fa; padding: 8px 12px; max-height: 330px; overflow: auto; margin: 0; }
img { max-width: 100%; height: auto; } img.px { image-rendering: pixelated; }
.note { color: #57606a; font-size: 14px; } figure.plot figcaption { max-width: 620px; }
"""


class ReportError(errors.UserError, RuntimeError):
    pass


# -- reading the work dir ------------------------------------------------------------------------

def read_log(path: Path) -> list[dict]:
    """log.jsonl's entries; a line a kill cut short is skipped."""
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def segments(train: list[dict]) -> list[list[dict]]:
    """The log's training entries split into runs (elapsed_s restarts at every start or resume)."""
    out: list[list[dict]] = []
    for e in train:
        if not out or e.get("elapsed_s", 0) < out[-1][-1].get("elapsed_s", 0) or e["iter"] <= out[-1][-1]["iter"]:
            out.append([])
        out[-1].append(e)
    return out


def history(entries: list[dict]) -> list[dict]:
    """The entries of the timeline that survived: a run resumed from an earlier checkpoint than
    its predecessor's last log line replaces that predecessor's entries from there on."""
    out: list[dict] = []
    for e in entries:
        while out and out[-1]["iter"] >= e["iter"]:
            out.pop()
        out.append(e)
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def lower_is_better(metric: str) -> bool:
    from fastgan.metrics.evaluator import LOWER_IS_BETTER   # imports torch: only when there are metrics
    return LOWER_IS_BETTER.get(metric, True)


# -- plots (matplotlib, imported on first use: ~0.6 s, once per process) -----------------------------

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins: bbox_inches="tight" or a layout engine draws every figure twice (2x the time).
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.3 / height)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _series(entries: list[dict], key: str) -> tuple[list, list]:
    pairs = [(e["iter"], e[key]) for e in entries if isinstance(e.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _lines(ax, entries, keys_labels, resumes, ylabel, **style) -> bool:
    drawn = False
    for key, label, kw in keys_labels:
        x, y = _series(entries, key)
        if x:
            ax.plot(x, y, label=label, **{**style, **kw})
            drawn = True
    for it in resumes:
        ax.axvline(it, color="#8c959f", linestyle=":", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:    # in a row above the axes: never over a curve, and no placement search (~10 ms a plot)
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), ncol=len(keys_labels), frameon=False)
    return drawn


def training_plots(train: list[dict], resumes: list[int]) -> dict[str, bytes]:
    """PNG bytes: 'losses', 'd_outputs', 'speed' (those the log has data for)."""
    out = {}
    fig = _figure(6.2, 3.1)
    ax = fig.add_subplot()
    if _lines(ax, train, [("loss_d", "D loss", {"linewidth": 1.4}), ("loss_g", "G loss", {"linewidth": 1.4}),
                          ("loss_d_real", "D loss, real", {"linewidth": 0.8, "linestyle": "--"}),
                          ("loss_d_fake", "D loss, fake", {"linewidth": 0.8, "linestyle": "--"})],
              resumes, "loss"):
        out["losses"] = _png(fig)
    fig = _figure(6.2, 3.1)
    ax = fig.add_subplot()
    if _lines(ax, train, [("d_real", "D(x)", {}), ("d_fake", "D(G(z)), D step", {}),
                          ("d_fake_g", "D(G(z)), G step", {"linestyle": "--"})], resumes, "mean sigmoid(D)",
              linewidth=1.2):
        ax.axhline(0.5, color="#8c959f", linewidth=0.8)
        ax.set_ylim(0, 1)
        out["d_outputs"] = _png(fig)
    fig = _figure(6.2, 2.4)
    ax = fig.add_subplot()
    if _lines(ax, train, [("img_per_s", "img/s", {"color": "#2da44e"})], resumes, "img/s", linewidth=1):
        ax.set_ylim(bottom=0)
        ax.get_legend().remove()
        out["speed"] = _png(fig)
    return out


def eval_plot(evals: dict[str, tuple[list, list]], best: dict[str, tuple[int, float]]) -> bytes:
    """One panel per metric, its best point starred."""
    names = list(evals)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(4.1 * cols, 2.6 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        x, y = evals[name]
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.2)
        bx, by = best[name]
        ax.plot([bx], [by], marker="*", markersize=13, color="#cf222e", linestyle="none", label=f"best {by:.4g} @ {bx}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


# -- the page ----------------------------------------------------------------------------------

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, mime: str, alt: str, width: int | None = None, pixelated: bool = False) -> str:
    size = f' width="{width}"' if width else ""
    cls = ' class="px"' if pixelated else ""
    return f'<img{cls} src="{_data_uri(data, mime)}"{size} alt="{html.escape(alt)}">'


def _image_file(path: Path, caption: str, mime: str) -> str:
    """A grid or GIF from the work dir, small ones scaled up by a whole factor."""
    from PIL import Image
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        w = im.width
    return (f"<figure>{_img(data, mime, caption, w * max(1, SHOWN_PX // w), pixelated=True)}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    def cell(v, tag):
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f'<{tag}{" class=num" if num and tag == "td" else ""}>{html.escape(str(v))}</{tag}>'
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(cell(h, "th") for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + cell(r[0], "th") + "".join(cell(v, "td") for v in r[1:]) + "</tr>")
    return "".join(out) + "</table>"


STEP_NAMES = {"GraphedStep": "one CUDA graph per iteration", "TrainStep": "no CUDA graph"}


def _setup_rows(cfg: dict, start: dict) -> list[tuple]:
    """Where and how the run trains: the newest start line of the log, and the config."""
    world, model, data = start.get("world_size", 1), cfg.get("model", {}), cfg.get("data", {})
    step = STEP_NAMES.get(start.get("step"), "not logged")
    params = f"; G {start['params_g']:,}, D {start['params_d']:,} parameters" if "params_g" in start else ""
    rows = [("device", f"{start['device']} x{world}" if start else "not logged (a run from before this page)"),
            ("backend", start.get("backend", f"{cfg.get('backend')} (config)")),
            ("amp, compile, step", f"{cfg.get('amp')}, {'on' if cfg.get('compile') else 'off'}, {step}"),
            ("model", f"{model.get('preset')}, {model.get('resolution')} px, {model.get('channels')} channels, "
                      f"width {model.get('base_channels') or 'of the preset'}{params}"),
            ("batch", f"{cfg.get('batch_size')} per process x {world}")]
    if start.get("loader"):
        rows.append(("data", f"{data.get('source')} {data.get('root')}, {start['loader']}"))
    return rows


def _progress_rows(cfg: dict, start: dict, train: list[dict]) -> list[tuple]:
    """Iterations, speed, time spent and left, the latest numbers."""
    total = cfg.get("total_iters", 0)
    done = train[-1]["iter"] if train else 0
    rows = [("iterations", f"{done:,} of {total:,} ({100 * done / total:.0f}%)" if total else f"{done:,}")]
    if not train:
        return rows
    runs = segments(train)
    first, last = runs[-1][0], runs[-1][-1]
    rate = statistics.median(e.get("img_per_s", 0) for e in runs[-1])
    rows.append(("img/s", f"{rate:,.1f} (median over the last run), latest {last.get('img_per_s', 0):,.1f}"))
    elapsed = sum(run[-1].get("elapsed_s", 0) for run in runs)
    rows.append(("elapsed", f"{_duration(elapsed)} training" + (f" over {len(runs)} runs" if len(runs) > 1 else "")))
    if len(runs[-1]) > 1:       # the pace between the last run's first and newest log lines
        its, span = last["iter"] - first["iter"], last.get("elapsed_s", 0) - first.get("elapsed_s", 0)
    else:
        its, span = last["iter"] - start.get("start_iter", 0), last.get("elapsed_s", 0)
    if done < total and span > 0 and its > 0:
        rows.append(("ETA", f"{_duration((total - done) * span / its)} at the last run's pace"))
    rows.append(("last log line", _when(last["time"]) if "time" in last else "?"))
    if "d_real" in last:
        rows.append(("D(x), D(G(z))", f"{last['d_real']:.3f}, {last['d_fake']:.3f} / {last['d_fake_g']:.3f} "
                                      "(D step / G step)"))
    rows.append(("losses", f"D {last.get('loss_d', float('nan')):.4f}, G {last.get('loss_g', float('nan')):.4f}"))
    return rows


def _eval_section(cfg: dict, entries: list[dict]) -> tuple[str, dict | None]:
    evals: dict[str, tuple[list, list]] = {}
    scored = [e for e in entries if "iter" in e and any(k.startswith("eval/") for k in e)]
    for e in history(scored):
        for k, v in e.items():
            if k.startswith("eval/") and isinstance(v, (int, float)):
                xs, ys = evals.setdefault(k[5:], ([], []))
                xs.append(e["iter"])
                ys.append(v)
    if not evals:
        return ('<p class="note">No evaluation in this run: set <code>eval_interval</code> (and '
                '<code>eval.metrics</code>) to score the generator during training.</p>'), None
    best = {}
    for name, (xs, ys) in evals.items():
        pick = min if lower_is_better(name) else max
        i = pick(range(len(ys)), key=lambda j: ys[j])
        best[name] = (xs[i], ys[i])
    chosen = cfg.get("eval", {}).get("best_metric") or ""
    rows = [(name + (" (ckpt/best.pt follows it)" if name == chosen else ""), f"{ys[-1]:.6g}", f"{best[name][1]:.6g}",
             best[name][0], "lower" if lower_is_better(name) else "higher")
            for name, (xs, ys) in evals.items()]
    body = (_table(rows, ("metric", "latest", "best", "at iteration", "better")) + "<br>"
            + _img(eval_plot(evals, best), "image/png", "evaluation metrics over iterations"))
    return body, ({"metric": chosen, "iter": best[chosen][0], "value": best[chosen][1]} if chosen in best else None)


def _checkpoints(work: Path, best: dict | None) -> str:
    rows = []
    found = [(p, str(n)) for n, p in reversed(files.numbered(work / "ckpt", ".pt"))]
    if (work / "ckpt" / "best.pt").is_file():
        found.append((work / "ckpt" / "best.pt",
                      f"{best['iter']} (best {best['metric']} {best['value']:.4g})" if best else "best"))
    for p, it in found:
        try:
            st = p.stat()
        except FileNotFoundError:    # pruned by the running training since the listing
            continue
        rows.append((f"ckpt/{p.name}", it, f"{st.st_size / 2**20:.1f} MB", _when(st.st_mtime)))
    gen = work / "generator.safetensors"
    if gen.is_file():
        st = gen.stat()
        rows.append(("generator.safetensors", "final", f"{st.st_size / 2**20:.1f} MB", _when(st.st_mtime)))
    if not rows:
        return '<p class="note">No checkpoint yet.</p>'
    return _table(rows, ("file", "iteration", "size", "written"))


def build(work_dir: str | Path) -> str:
    """The page's HTML for the run in work_dir."""
    work = Path(work_dir)
    cfg_path = work / "config.json"
    if not cfg_path.is_file():
        raise ReportError(f"{work} is not a fastgan work dir: it has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ReportError(f"cannot read {cfg_path}: {e}") from None
    entries = read_log(work / "log.jsonl")
    train = [e for e in entries if "loss_g" in e and "iter" in e]
    resumes = [e["iter"] for e in entries if e.get("event") == "resume" and "iter" in e]
    starts = [e for e in entries if e.get("event") == "start"]
    rows = _progress_rows(cfg, starts[-1] if starts else {}, train)
    rows[1:1] = _setup_rows(cfg, starts[-1] if starts else {})
    finished = bool(train) and train[-1]["iter"] >= cfg.get("total_iters", 0)
    status = "finished" if finished else "running, or stopped (see the last log line)"
    plots = training_plots(history(train), resumes)
    eval_html, best = _eval_section(cfg, entries)

    samples = work / "training_samples"
    grids = list_grids(samples)
    pictures = []
    if grids:
        pictures.append(_image_file(grids[-1][1], f"generated: iteration {grids[-1][0]} (fixed noise, G in eval mode)",
                                    "image/png"))
    if (samples / "real.png").is_file():
        pictures.append(_image_file(samples / "real.png", "real: training images as the model sees them",
                                    "image/png"))
    if (samples / "progress.gif").is_file() and grids:
        progress = _image_file(samples / "progress.gif", f"the fixed-noise grids of iterations {grids[0][0]} to "
                               f"{grids[-1][0]} in order ({len(grids)} grids), the newest held longest", "image/gif")
    else:
        progress = '<p class="note">No sample grid yet.</p>'

    def plot(key: str, caption: str) -> str:
        if key not in plots:
            return '<p class="note">No log lines yet.</p>'
        figure = _img(plots[key], "image/png", caption)
        return f'<figure class="plot">{figure}<figcaption>{html.escape(caption)}</figcaption></figure>'

    title = html.escape(str(work.resolve().name))
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fastgan: {title}</title><style>{STYLE}</style></head><body>",
        f"<h1>fastgan run: {html.escape(str(work))}</h1>",
        f'<p class="sub">{html.escape(status)}; page written {_when(time.time())}</p>',
        '<section id="run"><h2>The run</h2><div class="row">', _table(rows),
        f"<pre>{html.escape(json.dumps(cfg, indent=1))}</pre></div></section>",
        '<section id="samples"><h2>Samples</h2><div class="row">',
        "".join(pictures) or '<p class="note">No sample grid yet.</p>', "</div></section>",
        '<section id="losses"><h2>Losses and D outputs</h2><div class="row">',
        plot("losses", "Losses, the mean over each log interval: D = BCE(D(G(z)), 0) + BCE(D(x), 1), "
                       "G = BCE(D(G(z)), 1)."),
        plot("d_outputs", "D's mean output, sigmoid of its logits: D(x) on the real batch, D(G(z)) on the "
                          "fake batch in the D step and again in the G step, after D's update."),
        "</div></section>",
        '<section id="progress"><h2>Progress</h2>', progress, "</section>",
        '<section id="speed"><h2>Throughput</h2>',
        plot("speed", "img/s over each log interval; samples, checkpoints and this page count in the interval "
                      "they are written in."),
        "</section>",
        f'<section id="eval"><h2>Evaluation</h2>{eval_html}</section>',
        f'<section id="checkpoints"><h2>Checkpoints</h2>{_checkpoints(work, best)}</section>',
        "</body></html>",
    ]
    return "\n".join(parts)


def write(work_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page, whole or not at all (files.write_text): a reader never sees half of it."""
    page = build(work_dir)
    return files.write_text(Path(out) if out else Path(work_dir) / "report.html", page)


def write_quietly(work_dir: str | Path, say=print, writes=None) -> Path | None:
    """write() for the training loop: a failure is one warning line, never the end of training.
    writes: train.py's faults.BestEffort, which warns about a full or read-only disk only once."""
    try:
        if writes is None:
            return write(work_dir)
        with writes("report.html"):
            return write(work_dir)
    except Exception as e:  # noqa: BLE001  (the report is a view; training goes on without it)
        say(f"warning: report.html not written: {type(e).__name__}: {e}")
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python fastgan/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("work_dir", help="a training run's work_dir (config.json, log.jsonl, ...)")
    p.add_argument("--out", default=None, help="default: WORK_DIR/report.html")
    args = p.parse_args(argv)
    t = time.perf_counter()
    out = write(args.work_dir, args.out)        # a ReportError or OSError is one line (errors.main)
    print(f"{out} ({out.stat().st_size / 2**10:,.0f} KiB, {time.perf_counter() - t:.2f} s)")
    return 0


if __name__ == "__main__":
    errors.main(main, oom_hint="free host memory")
