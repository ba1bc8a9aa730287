"""The paper's ablation in miniature: DSPO, DSPO without the filter, and token-level GRPO, at equal wall time.

    python -m tools.ablation                                 # 3 methods x 2 seeds, one after another
    python -m tools.ablation --minutes 6 -- --lr 1e-5        # flags after -- go to every train.py run

Each run is `python train.py <flags> --seed S --max-minutes M` in its own process, so every method gets the
same training-loop wall time and the same seeds (a seed fixes the synthetic world, the held-out questions
and the question order). Runs of one seed are started back to back, method after method, so a machine that
slows down slows every method alike. At the end plot.py draws held-out EM and training reward against wall
time (mean over seeds, min-max band) into <out>/ablation.png and writes its table to <out>/ablation.md.
A run folder that already holds a finished run (a metrics.jsonl with an evaluation-only last line) is
kept, so an interrupted ablation resumes where it stopped.

Left out: running methods in parallel (they would share the cores and their timings would mean nothing),
and significance tests (two seeds say little; the table reports the spread).
"""
import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

# label: (run folder prefix, train.py flags)
METHODS = {"DSPO": ("dspo", []), "DSPO, no filter": ("dspo-nofilter", ["--no-filter"]),
           "GRPO (token-level)": ("grpo", ["--loss", "grpo"])}


def finished(run: Path) -> bool:
    """True when the run's metrics end with the final evaluation line (a step with no training keys)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return False
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return bool(lines) and "reward" not in json.loads(lines[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=12, help="training-loop wall time of every run (about "
                        "what the default train.py run's steps and evaluations take on a 2-core laptop)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, each run for every method")
    parser.add_argument("--eval-every", type=int, default=5, help="train.py --eval-every for every run")
    parser.add_argument("--out", default="runs/ablation", help="folder for the runs, ablation.png and ablation.md")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    runs = {method: [] for method in METHODS}
    for seed in seeds:
        for method, (folder, flags) in METHODS.items():
            run = out / f"{folder}-seed{seed}"
            runs[method].append(run)
            if finished(run):
                print(f"{run}: finished earlier, kept")
                continue
            command = [sys.executable, "train.py", *extra, *flags, "--seed", str(seed), "--steps", "100000",
                       "--max-minutes", str(args.minutes), "--eval-every", str(args.eval_every), "--out", str(run)]
            print(f"{datetime.datetime.now():%H:%M} {' '.join(command)}", flush=True)
            shutil.rmtree(run, ignore_errors=True)  # an interrupted run starts again from nothing, for equal time
            subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)

    from tools import plot  # matplotlib is needed only here, at the end
    figure = plot.plot_runs(runs, out / "ablation.png", x="time")
    table = plot.table(runs)
    header = (f"`python -m tools.ablation --minutes {args.minutes:g} --seeds {args.seeds} "
              f"--eval-every {args.eval_every}"
              + (f" -- {' '.join(extra)}" if extra else "") + f"`, {datetime.date.today()}\n\n")
    (out / "ablation.md").write_text(header + table + "\n")
    print(header + table)
    print(f"figure: {figure}")
    return runs


if __name__ == "__main__":
    main()
