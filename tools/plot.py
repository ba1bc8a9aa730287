"""Look at a run: metrics.jsonl as one PNG, or several runs (seeds grouped by a label) on shared axes.

    python -m tools.plot runs/dspo                          # -> runs/dspo/metrics.png
    python -m tools.plot runs/dspo/metrics.jsonl --x time --out dspo.png
    python -m tools.plot --compare dspo=runs/a,runs/b grpo=runs/c,runs/d --out ablation.png   # also prints a table

Each line of metrics.jsonl is one step of train.py. A step number written twice (a run resumed from a
checkpoint older than its last line) is one step: the lines are merged in file order, the later value
winning for a key both hold. Metrics at step s describe the policy after s updates, so on the time axis
they sit at the training minutes spent reaching it:  t(s) = sum over steps u < s of (time/rollout_s(u) +
time/update_s(u)) / 60. Evaluation time (time/eval_s) is not counted, nor are steps lost to a crash
and redone after --resume; the table's "train minutes" are the same sum.

Several seeds of one label are drawn as their mean on a common grid (the union of their x values where
all seeds overlap, each seed linearly interpolated onto it) inside a shaded min-max band.

Left out: smoothing, log scales, interactive windows, metrics not listed in PANELS. matplotlib is an
optional dependency, imported only when a figure is drawn, always through the headless Agg canvas.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

# (title, keys); a key ending in "/*" stands for every logged key under that prefix (one line per source).
PANELS = [("training reward (sampled trajectories)", ["reward"]),
          ("held-out EM (greedy)", ["val/em", "val/em/*"]),
          ("groups with all-equal rewards", ["frac_reward_zero_std"]),
          ("clipped fraction", ["clip_ratio/low_mean", "clip_ratio/high_mean"]),
          ("searches per trajectory", ["env/number_of_valid_search", "val/searches"]),
          ("seconds per step", ["time/rollout_s", "time/update_s"])]
X_LABELS = {"step": "step", "time": "training minutes (rollout + update)"}


class MetricsError(ValueError):
    """A problem in a metrics file; the message is one line, 'path:line: what'."""


def metrics_path(run) -> Path:
    """A run folder or a metrics.jsonl path -> the metrics.jsonl path."""
    path = Path(run)
    return path / "metrics.jsonl" if path.is_dir() else path


def load_metrics(run) -> list[dict]:
    """One merged dict per step, sorted by step; NaN, Infinity and null values become float NaN."""
    path = metrics_path(run)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise MetricsError(f"{path}: cannot read ({error.strerror})") from None
    by_step = {}
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise MetricsError(f"{path}:{line_no}: not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise MetricsError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise MetricsError(f"{path}:{line_no}: expected a non-negative integer 'step', got {step!r}")
        values = {k: math.nan if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
                  for k, v in record.items()}
        by_step.setdefault(step, {}).update(values)
    if not by_step:
        raise MetricsError(f"{path}: no metrics lines")
    return [by_step[step] for step in sorted(by_step)]


def x_values(records: list[dict], x: str = "step") -> np.ndarray:
    """The x coordinate of every record: its step, or the training minutes spent before it. [N]."""
    if x == "step":
        return np.array([r["step"] for r in records], dtype=float)
    assert x == "time", x
    seconds = np.array([_step_seconds(r) for r in records])
    return np.concatenate([[0.0], np.cumsum(seconds)[:-1]]) / 60.0


def _step_seconds(record: dict) -> float:
    """Training time of one step; an evaluation-only line (or a NaN timing) counts 0."""
    return float(np.nansum([_number(record.get(key, 0.0)) for key in ("time/rollout_s", "time/update_s")]))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def series(records: list[dict], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, value) over the records that log `key`; a NaN value stays NaN (a gap in the line). [n], [n]."""
    xs = x_values(records, x)
    index = [i for i, r in enumerate(records) if key in r]
    return xs[index], np.array([_number(records[i][key]) for i in index])


def _expand(keys: list[str], records: list[dict]) -> list[str]:
    logged = sorted({k for r in records for k in r})
    return [name for key in keys
            for name in ([k for k in logged if k.startswith(key[:-1])] if key.endswith("/*") else [key])]


def _figure(rows: int, cols: int, size: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        sys.exit("tools.plot needs matplotlib: pip install matplotlib")
    # Figure + Agg canvas, never pyplot: no display needed and no global backend switched under a caller.
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False).ravel()


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def run_figure(records: list[dict], title: str, x: str = "step"):
    """PANELS of one run's merged records, a matplotlib Figure (2 x 3 panels, 1500 x 800 pixels)."""
    figure, axes = _figure(2, 3, (15, 8))
    for ax, (panel, keys) in zip(axes, PANELS):
        ax.set_title(panel)
        ax.set_xlabel(X_LABELS[x])
        drawn = 0
        for key in _expand(keys, records):
            xs, ys = series(records, key, x)
            if len(xs):
                ax.plot(xs, ys, marker="o" if len(xs) <= 60 else None, markersize=3, label=key,
                        linestyle="--" if key.startswith("val/em/") else "-")  # per source: dashed
                drawn += int(np.isfinite(ys).any())
        if not ax.lines:
            _note(ax, "not logged")
        elif not drawn:
            _note(ax, "only NaN logged")
        else:
            ax.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def plot_run(run, out=None, x: str = "step") -> Path:
    """Draw one run into a PNG (default: metrics.png beside its metrics.jsonl); return the PNG's path."""
    out = Path(out) if out else metrics_path(run).with_name("metrics.png")
    run_figure(load_metrics(run), str(metrics_path(run)), x).savefig(out)
    return out


def band(curves: list[tuple[np.ndarray, np.ndarray]]):
    """(grid, mean, min, max, seeds used) of several (x, y) curves where they all overlap; None if they
    do not. NaN points are dropped, and a curve with none left (a seed that never logged it) is left out."""
    curves = [(xs[np.isfinite(ys)], ys[np.isfinite(ys)]) for xs, ys in curves]
    curves = [(xs, ys) for xs, ys in curves if len(xs)]
    if not curves:
        return None
    start, end = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
    grid = np.unique(np.concatenate([xs[(xs >= start) & (xs <= end)] for xs, _ in curves]))
    if len(grid) == 0:
        return None
    stacked = np.stack([np.interp(grid, xs, ys) for xs, ys in curves])  # [seeds, grid]
    return grid, stacked.mean(0), stacked.min(0), stacked.max(0), len(curves)


def plot_runs(runs: dict[str, list], out, x: str = "time") -> Path:
    """Held-out EM and training reward of every label: mean over its seeds in a min-max band."""
    loaded = {label: [load_metrics(path) for path in paths] for label, paths in runs.items()}
    figure, axes = _figure(1, 2, (12, 4.5))
    for ax, (title, key) in zip(axes, [("held-out EM (greedy)", "val/em"), ("training reward", "reward")]):
        ax.set_title(title)
        ax.set_xlabel(X_LABELS[x])
        for label, seeds in loaded.items():
            result = band([series(records, key, x) for records in seeds])
            if result is None:
                continue
            grid, mean, low, high, used = result
            line, = ax.plot(grid, mean, marker="o" if len(grid) <= 30 else None, markersize=3,
                            label=f"{label} (n={used})")
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            _note(ax, "not logged (or the seeds do not overlap)")
    figure.savefig(out)
    return Path(out)


def summary(records: list[dict]) -> dict:
    """One run in numbers: the first and last held-out EM and the last one's step; the zero-advantage
    fraction of trained trajectories (per-step fractions weighted by trained_trajectories); mean generation
    rounds and searches per trajectory over the steps; training minutes. NaN: not logged."""
    def mean_of(key, weight=None):
        pairs = [(_number(r[key]), _number(r.get(weight, 1.0)) if weight else 1.0) for r in records if key in r]
        pairs = [(v, w) for v, w in pairs if math.isfinite(v) and math.isfinite(w)]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else math.nan

    em = [(r["step"], _number(r["val/em"])) for r in records if math.isfinite(_number(r.get("val/em")))]
    return {"first_em": em[0][1] if em else math.nan,
            "final_em": em[-1][1] if em else math.nan, "final_em_step": em[-1][0] if em else None,
            "frac_zero_advantage": mean_of("frac_zero_advantage", weight="trained_trajectories"),
            "num_gen_batches": mean_of("num_gen_batches"),
            "searches": mean_of("env/number_of_valid_search"),
            "minutes": sum(_step_seconds(r) for r in records) / 60.0}


def table(runs: dict[str, list]) -> str:
    """A markdown table, one row per label: seed means of summary(); EM also with half its min-max range."""
    def show(values, digits):
        values = [v for v in values if math.isfinite(v)]
        return f"{np.mean(values):.{digits}f}" if values else "not logged"

    rows = ["| run | seeds | val/em at step 0 | final val/em (mean ± half range) | at step | zero-advantage frac "
            "| gen rounds / step | searches / trajectory | train minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for label, paths in runs.items():
        numbers = [summary(load_metrics(path)) for path in paths]
        em = [n["final_em"] for n in numbers if math.isfinite(n["final_em"])]
        em_text = f"{np.mean(em):.3f} ± {(max(em) - min(em)) / 2:.3f}" if em else "not logged"
        em_text += f" (n={len(em)})" if 0 < len(em) < len(paths) else ""
        steps = sorted({n["final_em_step"] for n in numbers if n["final_em_step"] is not None})
        # Seeds evaluated last at different steps (one stopped early) are flagged by a range here.
        step_text = "-" if not steps else f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        first_em = show([n["first_em"] for n in numbers], 3)
        rows.append(f"| {label} | {len(paths)} | {first_em} | {em_text} | {step_text} | "
                    f"{show([n['frac_zero_advantage'] for n in numbers], 3)} | "
                    f"{show([n['num_gen_batches'] for n in numbers], 2)} | "
                    f"{show([n['searches'] for n in numbers], 2)} | {show([n['minutes'] for n in numbers], 1)} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?", help="a run folder or its metrics.jsonl")
    p.add_argument("--compare", nargs="+", metavar="LABEL=RUN[,RUN...]",
                   help="several labelled runs (seeds comma-separated): one figure and a markdown table")
    p.add_argument("--x", choices=["step", "time"], default=None,
                   help="x axis: step or training minutes (default: step for one run, time with --compare)")
    p.add_argument("--out", default=None, help="PNG to write (default: metrics.png beside metrics.jsonl, "
                   "or compare.png with --compare)")
    args = p.parse_args(argv)
    if bool(args.run) == bool(args.compare):
        p.error("give one run, or --compare LABEL=RUN[,RUN...] ...")
    try:
        if args.run:
            print(f"wrote {plot_run(args.run, args.out, args.x or 'step')}")
            return
        runs = {}
        for item in args.compare:
            label, _, paths = item.partition("=")
            if not label or not paths or label in runs:
                p.error(f"--compare: expected distinct LABEL=RUN[,RUN...], got {item!r}")
            runs[label] = [path for path in paths.split(",") if path]
        print(table(runs))
        print(f"wrote {plot_runs(runs, args.out or 'compare.png', args.x or 'time')}")
    except MetricsError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
