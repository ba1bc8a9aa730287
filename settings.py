"""Which value each setting takes, and whether the run can start: presets by model size and hardware, what
--resume keeps of the saved run, and the checks made before anything slow (paths, memory).

Every flag of PRESETS that is not given takes the preset's value; the run prints every setting and where
it came from (flag, preset, default, resumed). train.py defines the flags; this file decides their values.
"""
import os
import sys
import tempfile
from pathlib import Path

import torch

from data import FLASHRAG_SPLITS

# Settings that depend on the model's size and the hardware. A flag given on the command line wins over
# the preset; the run prints every value and where it came from. Sources of the values:
# - laptop: SmolLM2-135M on the synthetic world, chosen by the demo runs in results/ (a 135M model reads one
#   passage as well as two and writes noise at temperature 1, so: top-1, short turns, T 0.5, few-shot).
# - the GPU presets: Search-R1's NQ + HotpotQA recipe (group of 5, top-3 passages, up to 4 searches, 500
#   tokens a turn, a 4,096-token context, temperature 1, lr 1e-6 warmed up over 28.5% of the optimizer
#   steps, 2 mini-batches a batch, a zero-shot instruction). Precision: on one GPU, bf16 weights with
#   stochastic rounding, 8 bytes a parameter, is what fits a 7B's update in 80 GB (results/); sharded over
#   several GPUs, fp32 master weights with bf16 compute, exact, 16 bytes a parameter divided among them.
PRESETS = {
    "laptop": dict(dtype="float32", amp=False, rounding="kahan", grad_checkpointing=False, template="few-shot",
                   batch_prompts=4, group_size=4, max_turns=2, topk=1, max_turn_tokens=24,
                   max_response_tokens=320, temperature=0.5, rollout_batch=64, steps=10, lr=5e-6, warmup=0,
                   micro_batch=8, micro_batch_tokens=0, eval_every=10, eval_size=120, save_every=10),
    "one GPU": dict(dtype="bfloat16", amp=False, rounding="stochastic", grad_checkpointing=True,
                    template="zero-shot", batch_prompts=64, group_size=5, max_turns=4, topk=3, max_turn_tokens=500,
                    max_response_tokens=4096, temperature=1.0, rollout_batch=64, steps=500, lr=1e-6, warmup=285,
                    micro_batch=8, micro_batch_tokens=4096, eval_every=50, eval_size=500, save_every=50),
    "many GPUs": dict(dtype="float32", amp=True, rounding="kahan", grad_checkpointing=True, template="zero-shot",
                      batch_prompts=256, group_size=5, max_turns=4, topk=3, max_turn_tokens=500,
                      max_response_tokens=4096, temperature=1.0, rollout_batch=160, steps=500, lr=1e-6, warmup=285,
                      micro_batch=8, micro_batch_tokens=8192, eval_every=50, eval_size=500, save_every=50),
}

# Why the laptop preset takes each value (printed by --help). The demo is SmolLM2-135M on two CPU cores.
LAPTOP_REASONS = {
    "dtype": "bf16 matrix products are slow on CPUs without bf16 units, and a 135M model fits in float32",
    "amp": "no bf16 compute on CPU, for the same reason",
    "rounding": "used only with bf16 weights",
    "grad_checkpointing": "a 135M model's activations fit; recomputing them would only cost time",
    "template": "a 135M model ignores a bare instruction but copies worked episodes",
    "batch_prompts": "four informative groups keep a step's update under a minute on two cores",
    "group_size": "four tries of a question often differ in reward, and cost a quarter of what sixteen do",
    "max_turns": "the synthetic world's questions take one or two searches",
    "topk": "a 135M model reads one passage as well as two, and a short context decodes faster",
    "max_turn_tokens": "a search or an answer fits; a turn that rambles is cut early",
    "max_response_tokens": "two searches, their passages and an answer fit",
    "temperature": "at 1.0 a 135M model writes noise that ends in truncation",
    "rollout_batch": "a round's trajectories and an evaluation's questions decode in one batch",
    "steps": "enough for the demo to move held-out EM in a quarter of an hour of two cores",
    "lr": "large enough to move a 135M model in ten steps",
    "warmup": "ten steps leave no room for a warm-up",
    "micro_batch": "a whole mini-batch in one pass, so the shared prompt prefix is encoded once",
    "micro_batch_tokens": "no cap is needed at this size",
    "eval_every": "with the preset's steps, evaluates before the first step and after the last only",
    "eval_size": "all of the synthetic world's held-out questions, so one question moves EM as little as it can "
                 "(other data: that many, taken in turn from each source)",
    "save_every": "one checkpoint, at the end",
}


def pick_preset(parameters: int, processes: int) -> str:
    """laptop below 1B parameters (whatever the device); above, one GPU or many by the process count."""
    if parameters < 1e9:
        return "laptop"
    return "one GPU" if processes == 1 else "many GPUs"


def apply_preset(args, parser, parameters: int, processes: int) -> None:
    """Fill every setting of PRESETS that no flag gave from the preset for a model of `parameters` on
    `processes` processes. args.preset names it; args.sources[name] is "flag", "preset" or "default"."""
    args.preset = pick_preset(parameters, processes)
    args.sources = {}
    for name, value in vars(args).copy().items():
        if name in PRESETS[args.preset] and value is None:
            setattr(args, name, PRESETS[args.preset][name])
            args.sources[name] = "preset"
        elif name not in ("preset", "sources"):
            given = name in PRESETS[args.preset] or value != parser.get_default(name)
            args.sources[name] = "flag" if given else "default"


def preset_help() -> str:
    """--help's table of the presets, one row per setting."""
    names = list(PRESETS)
    lines = ["presets (a flag given overrides its value; the run prints which applied):",
             f"  {'setting':<20}" + "".join(f"{n:>12}" for n in names)]
    lines += [f"  --{key.replace('_', '-'):<18}" + "".join(f"{str(PRESETS[n][key]):>12}" for n in names)
              for key in PRESETS[names[0]]]
    lines.append("laptop: models under 1B parameters; one GPU / many GPUs: 1B and up, one process / torchrun. "
                 "The GPU values come from Search-R1's recipe and the one-GPU fit of a 7B (settings.py's PRESETS "
                 "says which). Why the laptop takes its values:")
    lines += [f"  --{key.replace('_', '-'):<20} {LAPTOP_REASONS[key]}" for key in PRESETS["laptop"]]
    return "\n".join(lines)


def settings_table(args, parameters: int, processes: int) -> str:
    """Every effective setting and where it came from, two to a line, for the start of a run."""
    cells = [f"{name.replace('_', '-'):<20} {str(value):<14} {args.sources[name]:<7}"
             for name, value in vars(args).items() if name in args.sources]
    rows = [" | ".join(cells[i:i + 2]) for i in range(0, len(cells), 2)]
    return (f"preset {args.preset} (a model of {parameters / 1e9:.2f}B parameters, {processes} process"
            f"{'es' if processes > 1 else ''}); settings:\n  " + "\n  ".join(rows))


def state_bytes(parameters: int, dtype: str, amp: bool, rounding: str, processes: int) -> float:
    """Bytes one device holds for weights, gradients and AdamW's moments: 16 a parameter in float32, 10 in
    bf16 with Kahan compensation, 8 in bf16 with stochastic rounding. Sharded over `processes`, each holds its
    share, plus the full parameters it gathers to generate (bf16 with --amp). Activations come on top."""
    per_parameter = 16 if dtype == "float32" else 10 if rounding == "kahan" else 8
    if processes == 1:
        return parameters * per_parameter
    return parameters * (per_parameter / processes + (2 if amp or dtype == "bfloat16" else 4))


def device_bytes(device: str, processes: int) -> float:
    """Memory of one GPU, or this host's RAM shared by the processes on it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / local


def check_fit(model: str, parameters: int, dtype: str, amp: bool, rounding: str, eval_only: bool, processes: int,
              device: str, available: float) -> None:
    """Stop before any weight is read when the weights and optimizer state alone exceed the device."""
    needed = state_bytes(parameters, dtype, amp, rounding, processes)
    if eval_only:  # no gradients or optimizer state: the weights, whole on every device to generate
        needed = parameters * (4 if dtype == "float32" else 2)
    if needed <= available:
        return
    layout = f"{dtype}" + (" + amp" if amp else "") + (f" + {rounding} rounding" if dtype == "bfloat16" else "")
    smallest = state_bytes(parameters, "bfloat16", False, "stochastic", processes)
    advice = "pass --dtype bfloat16 --rounding stochastic (8 bytes a parameter)" if smallest <= available else \
        f"even bf16 with stochastic rounding needs {smallest / 2 ** 30:.0f} GiB: shard it over more GPUs with " \
        "torchrun, or train a smaller model"
    sys.exit(f"error: --model {model} ({parameters / 1e9:.1f}B parameters, {layout}) needs about "
             f"{needed / 2 ** 30:.0f} GiB for weights, gradients and AdamW state on each device, more than the "
             f"{available / 2 ** 30:.0f} GiB of {device}; {advice}")


def check_paths(data: str, eval_data: str | None, corpus: str | None, out: str) -> None:
    """Stop in one line naming the flag and the path when an input file is missing or --out cannot be
    written, before anything slow (a model conversion, a download, an index build) has happened. Writing is
    tested by creating a file where the run will, because permission bits say nothing for root."""
    specs = [("--data", data)] if data not in ("synthetic", "search-r1") else []
    for flag, spec in specs + ([("--eval-data", eval_data)] if eval_data else []):
        for item in (part.strip() for part in spec.split(",")):
            if item and item not in FLASHRAG_SPLITS and not Path(item).is_file():
                alone = "synthetic or search-r1 alone, or " if flag == "--data" else ""
                sys.exit(f"error: {flag} {item}: no such file, and not a dataset name ({alone}a comma-separated mix "
                         f"of {', '.join(FLASHRAG_SPLITS)} and QA JSONL files)")
    if corpus and not Path(corpus).is_file():
        sys.exit(f"error: --corpus {corpus}: no such file")
    folder = next(path for path in [Path(out), *Path(out).parents] if path.exists() or path == path.parent)
    if not folder.is_dir():
        where = "is a file" if folder == Path(out) else f"lies under the file {folder}"
        sys.exit(f"error: --out {out}: {where}; it must be a folder (made if missing)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dspo-write-test-"):
            pass
    except OSError as error:
        sys.exit(f"error: --out {out}: cannot write in {folder} ({error.strerror})")


# What --resume does with a setting that differs from the saved run's. NOT_CARRIED_OVER says what this
# command does and where, and always takes today's value, silently. Any other setting not given now
# continues with the saved value. A flag given with a new value: HOW_LONG takes it with a note;
# REFUSED_ON_RESUME stops (the checkpoint's model is what resume loads; another seed reshuffles the data
# mid-epoch or, synthetic, builds another world, as another fact order does; the optimizer state was saved for the other weight dtype or
# bf16 rounding; with --eval-only only --model is refused); --lr is applied to the loaded optimizer; every
# other hyperparameter (template, batch shape, clips, loss, warm-up, ...) takes the new value, printed.
NOT_CARRIED_OVER = {"out", "resume", "device", "dist_timeout", "eval_only", "baseline", "trust_remote_code"}
HOW_LONG = {"steps", "max_minutes", "eval_every", "eval_size", "save_every", "keep"}
REFUSED_ON_RESUME = {"model", "seed", "fact_order", "dtype", "rounding"}
# What a greedy evaluation reads besides the weights: its questions, the corpus, the rollout settings greedy
# decoding uses (a batch pads otherwise, so sums may round otherwise) and the compute precision. Changed on
# resume, they have train.py evaluate the resumed checkpoint again; any other change keeps the logged one.
# "processes" is not a flag: the process count splits an evaluation's questions, so it batches them otherwise.
CHANGES_EVALUATION = {"data", "eval_data", "corpus", "eval_size", "template", "max_turns", "topk",
                      "max_turn_tokens", "max_response_tokens", "rollout_batch", "amp", "processes"}


def continue_settings(args, saved: dict | None, checkpoint: Path, processes: int) -> dict[str, str]:
    """Reconcile args with the settings `checkpoint` was saved with (see REFUSED_ON_RESUME); returns, per
    flag given with a new value, a line saying which value is used, and under "processes" a line when the
    run that saved it had another process count (or did not record one). Effective values are compared, so a
    flag equal to the saved value (given or from a preset) says nothing."""
    if saved is None:
        return {"run_args": f"--resume: {checkpoint} has no run_args.json (an older checkpoint): the flags given "
                            "now apply"}
    notes = {}
    for name, before in saved.items():
        now = getattr(args, name, before)
        if name not in args.sources or name in NOT_CARRIED_OVER or now == before:
            continue
        flag = f"--{name.replace('_', '-')}"
        if args.sources[name] != "flag":
            setattr(args, name, before)
            args.sources[name] = "resumed"
        elif name in REFUSED_ON_RESUME and (name == "model" or not args.eval_only) and \
                (name != "rounding" or args.dtype == "bfloat16"):
            sys.exit(f"error: {flag} {now}: {checkpoint} was saved by a run with {flag} {before}; a changed {flag} "
                     f"cannot continue it: start a new --out, or drop {flag}")
        else:
            effect = "applied to the optimizer" if name == "lr" else "" if name in HOW_LONG else \
                "a changed hyperparameter"
            notes[name] = f"--resume: {flag} {now} (the saved run had {before}): using {now}" + \
                (f", {effect}" if effect else "")
    if saved.get("processes") != processes:
        count = saved.get("processes")
        saver = f"was saved by a run of {count} process{'es' if count != 1 else ''}" if count else \
            "does not record how many processes saved it"
        notes["processes"] = f"--resume: {checkpoint} {saver}, this one has {processes}: its evaluation is run again"
    return notes
