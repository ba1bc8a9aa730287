"""Checkpoints that never lose work: written atomically, resumed exactly, saved on a signal.

A checkpoint is a folder checkpoint-NNNNNN/ (exactly six digits: other names in --out are the user's and
are never picked or deleted) with the HF weights and tokenizer (from_pretrained loads it), trainer_state.pt
(optimizer, scheduler, step, RNG states, position in the data) and run_args.json (the run's settings, which
train.py compares on resume). It is written under a temporary name and renamed, so a crash mid-write leaves
the previous one intact; rotation keeps the --keep newest up to the one just written. A run resumed from an
older checkpoint moves the later ones into abandoned-<UTC time>/, so a later --resume does not take them.
--resume takes the newest checkpoint that is
intact (trainer_state.pt opens, every safetensors header parses), saying which broken ones it passed over.
With several processes every rank helps gather the full state and rank 0 writes it.

A run holds an exclusive flock on <out>/.lock for its life, so a second run on the same --out stops at once;
the kernel drops the lock when the process dies, so a stale file never blocks. On resume, metrics.jsonl
loses the lines a later, unsaved step wrote (moved to metrics.dropped.jsonl), so each step is logged once.
A fresh run (no --resume) in a folder an earlier run wrote moves that run's metrics and checkpoints into
earlier-<UTC time>/ inside it, so two runs never share one metrics.jsonl and nothing is deleted.
A first SIGINT / SIGTERM raises a flag that the training loop reads at the end of a step; a second exits at
once.

Left out: sharded (per-rank) checkpoint files, asynchronous saving, keeping the best checkpoint by score,
and a full check of the weights' bytes (the intact test reads headers, not every tensor).
"""
import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from distributed import rank_and_size


CHECKPOINT_NAME = re.compile(r"checkpoint-\d{6}")  # what save_checkpoint writes; nothing else is ours


def checkpoints_in(out: Path) -> list[Path]:
    """The trainer's checkpoint folders in `out`, oldest first (the zero-padded names sort by step)."""
    return sorted(path for path in out.glob("checkpoint-*") if CHECKPOINT_NAME.fullmatch(path.name) and path.is_dir())


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, data_state: dict,
                    keep: int, run_args: dict | None = None) -> Path:
    """Write into a temporary folder and rename it, so a crash never leaves a half-written checkpoint; then
    delete all but the `keep` newest up to this one. `run_args` (the run's settings) goes in run_args.json.
    With several ranks every rank helps gather the full weights and optimizer state; rank 0 writes them."""
    assert keep >= 1, keep
    rank, size = rank_and_size()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options) if size > 1 else None
    if model_state is not None and model.config.tie_word_embeddings:  # the head is the embedding: stored once
        model_state.pop("lm_head.weight", None)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state)
        if size > 1:  # FSDP2 renamed the class (FSDPQwen2ForCausalLM); the checkpoint names the model's own
            model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
            model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "data_state": dict(data_state),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "trainer_state.pt")
        (tmp / "run_args.json").write_text(json.dumps(run_args or {}, indent=1) + "\n")
        if final.exists():  # renamed out of the way, not deleted, until the new one is in place
            replaced = out / f".old-checkpoint-{step:06d}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp, final)
        older = [path for path in checkpoints_in(out) if path.name < final.name]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old)
    if size > 1:
        dist.barrier()
    return final


SAME_REQUEST_S = 1.0  # a second signal this soon after the first is the same request (a launcher forwarding it)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM (Ctrl-C, a pre-empted job): the first says at once that the run stops after the current
    step and raises a flag the loop reads there (it saves a checkpoint and returns, so the process exits 0);
    a second, a second or more later, exits at once with status 128 + signal, keeping the last checkpoint.

    The signals are watched by a thread reading the interpreter's wake-up pipe, which the C-level handler
    writes the moment a signal arrives, so even a main thread blocked inside a C call (a forward pass, a
    collective) cannot delay the second signal's exit."""
    requested = []
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        first = None
        while byte := os.read(read_fd, 1):
            signum = byte[0]
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            now = time.monotonic()
            if first is None:
                first = now
                requested.append(signum)
                print(f"\n{signal.Signals(signum).name}: stopping after the current step, with a checkpoint "
                      "(signal again to stop now)", file=sys.stderr, flush=True)
            elif now - first >= SAME_REQUEST_S:
                print(f"{signal.Signals(signum).name} again: stopping now; the last checkpoint is kept",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(128 + signum)

    watcher = threading.Thread(target=watch, name="signal-watcher", daemon=True)
    watcher.start()
    try:
        yield requested
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join()
        os.close(read_fd)


def why_broken(checkpoint: Path) -> str | None:
    """None when `checkpoint` can be resumed, else what is wrong, in a few words. Cheap but sure for what
    goes wrong in practice (a truncated or missing file): trainer_state.pt is opened memory-mapped (a
    truncated zip has no central directory) and each weight file's safetensors header is parsed (it must
    cover the file's length), without reading the tensors."""
    from safetensors import safe_open
    state = checkpoint / "trainer_state.pt"
    if not state.is_file():
        return "no trainer_state.pt"
    try:
        torch.load(state, weights_only=True, mmap=True, map_location="cpu")["step"]
    except Exception as error:  # whatever fails to load cannot be resumed
        return f"trainer_state.pt does not load ({type(error).__name__}, truncated?)"
    index = checkpoint / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError) as error:
        return f"model.safetensors.index.json does not parse ({error})"
    for name in names:
        if not (checkpoint / name).is_file():
            return f"no {name}"
        try:
            with safe_open(checkpoint / name, "pt"):
                pass
        except Exception as error:
            return f"{name} does not load ({str(error).splitlines()[0]})"
    return None


def find_checkpoint(out: Path, resume: str) -> Path:
    """The checkpoint --resume names, or with "latest" the newest intact one in `out`, saying which broken
    ones it passed over; stops in one line when there is none. A folder the user named must be intact."""
    rank_zero = os.environ.get("RANK", "0") == "0"  # runs before torchrun's process group exists
    if resume != "latest":
        path = Path(resume)
        problem = "no such folder" if not path.is_dir() else why_broken(path)
        if problem:
            sys.exit(f"error: --resume {path}: not a checkpoint that can be resumed ({problem})")
        return path
    broken = []
    for path in reversed(checkpoints_in(out)):
        problem = why_broken(path)
        if problem is None:
            if broken and rank_zero:
                print(f"--resume: using {path.name}, the newest intact checkpoint", file=sys.stderr, flush=True)
            return path
        broken.append(f"{path.name}: {problem}")
        if rank_zero:
            print(f"--resume: {path} is broken ({problem}); trying an older one", file=sys.stderr, flush=True)
    if broken:
        sys.exit(f"error: --resume: no intact checkpoint in {out} ({'; '.join(broken)})")
    sys.exit(f"error: --resume: no checkpoint-NNNNNN folder in {out}")


def saved_run_args(checkpoint: Path) -> dict | None:
    """The settings the run saved with `checkpoint`, or None for a checkpoint from before they were saved."""
    path = checkpoint / "run_args.json"
    return json.loads(path.read_text()) if path.is_file() else None


_held_lock = []  # this process's run lock: one at a time (main() may run again in one process, as tests do)


RUN_FILES = ("metrics.jsonl", "metrics.dropped.jsonl", "metrics.png")


def set_aside_earlier_run(out: Path) -> Path | None:
    """Move what an earlier run wrote in `out` (RUN_FILES and its checkpoint folders) into a new
    out/earlier-<UTC time>/ and return that folder; None when there was nothing. Renames only."""
    return _set_aside(out, [out / name for name in RUN_FILES if (out / name).exists()] + checkpoints_in(out),
                      "earlier")


def set_aside_later_checkpoints(out: Path, step: int) -> Path | None:
    """Move the checkpoints of `out` past `step` into a new out/abandoned-<UTC time>/ and return it (None when
    there were none): a run resumed from an older checkpoint writes those steps again, and a later
    `--resume` must not take the abandoned run's newest. Renames only."""
    return _set_aside(out, [path for path in checkpoints_in(out) if path.name > f"checkpoint-{step:06d}"],
                      "abandoned")


def _set_aside(out: Path, paths: list[Path], prefix: str) -> Path | None:
    if not paths:
        return None
    aside = out / time.strftime(f"{prefix}-%Y%m%d-%H%M%S", time.gmtime())
    while aside.exists():  # two within a second
        aside = aside.with_name(aside.name + "-")
    aside.mkdir()
    for path in paths:
        os.replace(path, aside / path.name)
    return aside


def lock_run(out: Path) -> None:
    """Take an exclusive flock on <out>/.lock (which then holds this pid) for the rest of the process, or
    stop in one line naming the run that holds it. The kernel releases it when the process dies, so a lock
    file left by a killed run does not block; a lock this process took before is released first."""
    while _held_lock:
        _held_lock.pop().close()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        sys.exit(f"error: --out {out}: another run (pid {holder}) is using this folder; wait for it to end, "
                 "or give another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_lock.append(handle)


def trim_metrics(path: Path, step: int) -> tuple[int, dict | None]:
    """Keep the lines of metrics.jsonl that a resume from checkpoint `step` does not write again: the steps
    before it, and the evaluation-only line at `step` (the evaluation of that checkpoint, at the end of the
    run that saved it). A training line at or past `step` (a step logged but killed before its checkpoint,
    or a run resumed from an older checkpoint) and any line that does not parse are appended to
    metrics.dropped.jsonl beside it. Returns how many lines were dropped, and the kept evaluation at `step`
    (None if there is none)."""
    if not path.is_file():
        return 0, None
    kept, dropped, evaluation = [], [], None
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
            at_step = record["step"] == step and \
                all(key in ("step", "time/eval_s") or key.startswith("val/") for key in record)
            keep = record["step"] < step or at_step
            evaluation = record if at_step else evaluation
        except (ValueError, KeyError, TypeError):
            keep = not line.strip()
        (kept if keep else dropped).append(line if line.endswith("\n") else line + "\n")
    if dropped:
        with open(path.with_name("metrics.dropped.jsonl"), "a") as side:
            side.writelines(dropped)
        fresh = path.with_name(f".{path.name}.tmp")
        fresh.write_text("".join(kept))
        os.replace(fresh, path)
    return len(dropped), evaluation


def resume_state(checkpoint: Path, model, optimizer, scheduler, lr: float | None = None) -> tuple[int, dict]:
    """Load the optimizer, scheduler and RNG states of `checkpoint` (every rank reads the file; the weights
    were loaded with the model). The learning rate is set from this run's schedule at its current point, so
    a new `lr` (the base rate) or a new warm-up applies from the first step. Returns (step, data state)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if lr is not None:
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["data_state"]
