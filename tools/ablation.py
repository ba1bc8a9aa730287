"""The paper's ablation in miniature: DSPO, DSPO without the filter, and token-level GRPO with the filter, at
equal wall time.

    python -m tools.ablation                                 # 3 methods x 3 seeds, one after another
    python -m tools.ablation --seeds 0 -- --lr 3e-6          # flags after -- go to every train.py run

For each seed, DSPO runs first: `python train.py <flags> --seed S`, train.py's defaults, its own number of
steps. Its training loop's wall time (metrics' time/loop_s after its last step: evaluations, rollouts and
updates) then becomes the --max-minutes of the other two methods on that seed, which run until a step
crosses it, so each gets up to one step more than that (the tables give every run's minutes); --minutes M
instead gives every method, DSPO too, M minutes. Every run evaluates before its first step and after its
last only (so evaluation costs each method the same), a seed fixes the synthetic world, the held-out
questions and the question order, and the runs of one seed follow each other, so a machine that slows
down slows every method alike. At the end plot.py draws held-out EM and training reward
against wall time (mean over seeds, min-max band) into <out>/ablation.png and writes the table, with one
row per run, to <out>/ablation.md. A run folder that already holds a finished run (a metrics.jsonl with an
evaluation-only last line) is kept, so an interrupted ablation resumes where it stopped; a DSPO run made
again (without --minutes) makes its seed's other runs again, and <out>/ablation.json refuses a resume with
other flags.

Left out: running methods in parallel (they would share the cores and their timings would mean nothing),
and significance tests (three seeds say little; the tables report every seed).
"""
import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

# label: (run folder prefix, train.py flags). The GRPO runs keep the dynamic filter: only the loss differs.
METHODS = {"DSPO": ("dspo", []), "DSPO, no filter": ("dspo-nofilter", ["--no-filter"]),
           "token-level GRPO with the filter": ("grpo", ["--loss", "grpo"])}
# An --eval-every beyond any run's last step: train.py then evaluates at step 0 and after the last step only.
ONLY_FIRST_AND_LAST = "1000000"


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(run: Path) -> bool:
    """True when the run's metrics end with the final evaluation line (a step with no training keys)."""
    lines = records(run)
    return bool(lines) and "reward" not in lines[-1]


def loop_minutes(run: Path) -> float:
    """Minutes of the run's training loop up to the end of its last step (what --max-minutes measures)."""
    seconds = [r["time/loop_s"] for r in records(run) if "time/loop_s" in r]
    if not seconds:
        sys.exit(f"error: {run}/metrics.jsonl has no time/loop_s (a run older than the equal-time ablation): "
                 f"remove {run} or pass --minutes")
    return max(seconds) / 60


def per_seed_table(runs: dict[str, list[Path]]) -> str:
    """One row per run: held-out EM before and after (all, and by kind), searches a question at the end,
    steps and loop minutes."""
    rows = ["| run | seed | steps | loop minutes | val/em first → last | by kind, first → last | searches at the end |",
            "|---|---|---|---|---|---|---|"]
    for label, paths in runs.items():
        for path in paths:
            lines = records(path)
            evals = [r for r in lines if "val/em" in r]
            first, last = evals[0], evals[-1]
            kinds = sorted(k for k in first if k.startswith("val/em/"))
            by_kind = ", ".join(f"{k[len('val/em/'):]} {first[k]:.3f} → {last[k]:.3f}" for k in kinds)
            steps = sum("reward" in r for r in lines)
            rows.append(f"| {label} | {path.name.rsplit('seed', 1)[1]} | {steps} | {loop_minutes(path):.1f} | "
                        f"{first['val/em']:.3f} → {last['val/em']:.3f} ({last['val/em'] - first['val/em']:+.3f}) | "
                        f"{by_kind} | {last.get('val/searches', float('nan')):.2f} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=0, help="training-loop wall time of every run; 0: DSPO "
                        "runs train.py's defaults and the other methods get the time that took on the same seed")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each run for every method")
    parser.add_argument("--out", default="runs/ablation", help="folder for the runs, ablation.png and ablation.md")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made_with = {"minutes": args.minutes, "train.py flags": extra}
    if (out / "ablation.json").exists() and json.loads((out / "ablation.json").read_text()) != made_with:
        sys.exit(f"error: {out} holds an ablation made with {(out / 'ablation.json').read_text().strip()}, not "
                 f"{json.dumps(made_with)}: pass another --out")
    (out / "ablation.json").write_text(json.dumps(made_with) + "\n")
    runs = {method: [] for method in METHODS}
    for seed in seeds:
        minutes, dspo_ran = args.minutes, False
        for method, (folder, flags) in METHODS.items():
            run = out / f"{folder}-seed{seed}"
            runs[method].append(run)
            if not finished(run) or (dspo_ran and not args.minutes):  # a new DSPO run: a new time for the others
                dspo_ran = dspo_ran or method == "DSPO"
                timed = ["--steps", "100000", "--max-minutes", repr(minutes)] if minutes else []
                command = [sys.executable, "train.py", *extra, *flags, "--seed", str(seed), *timed,
                           "--eval-every", ONLY_FIRST_AND_LAST, "--out", str(run)]
                print(f"{datetime.datetime.now():%H:%M} {' '.join(command)}", flush=True)
                shutil.rmtree(run, ignore_errors=True)  # an interrupted run starts again from nothing, for equal time
                subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
            else:
                print(f"{run}: finished earlier, kept")
            minutes = minutes or loop_minutes(run)  # DSPO's time sets the others' on this seed

    from tools import plot  # matplotlib is needed only here, at the end
    figure = plot.plot_runs(runs, out / "ablation.png", x="time")
    header = (f"`python -m tools.ablation --seeds {args.seeds}" + (f" --minutes {args.minutes:g}" if args.minutes
              else "") + (f" -- {' '.join(extra)}" if extra else "") + f"`, {datetime.date.today()}\n\n")
    text = header + plot.table(runs) + "\n\n" + per_seed_table(runs) + "\n"
    (out / "ablation.md").write_text(text)
    print(text)
    print(f"figure: {figure}")
    return runs


if __name__ == "__main__":
    main()
