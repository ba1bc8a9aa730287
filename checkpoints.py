"""Checkpoints that never lose work: written atomically, resumed exactly, saved on a signal.

A checkpoint is a folder checkpoint-NNNNNN/ with the HF weights and tokenizer (from_pretrained loads it)
and trainer_state.pt (optimizer, scheduler, step, RNG states, position in the data). It is written under a
temporary name and renamed, so a crash mid-write leaves the previous one intact. With several processes
every rank helps gather the full state and rank 0 writes it. A first SIGINT / SIGTERM raises a flag that the
training loop reads at the end of a step; a second exits at once.

Left out: sharded (per-rank) checkpoint files, asynchronous saving, and keeping the best checkpoint by score.
"""
import contextlib
import os
import random
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

from models import world


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, data_state: dict,
                    keep: int) -> Path:
    """Write into a temporary folder and rename it, so a crash never leaves a half-written checkpoint.
    With several ranks every rank helps gather the full weights and optimizer state; rank 0 writes them."""
    rank, size = world()
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(out.glob("checkpoint-*"))[:-keep]:
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


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
    else:
        found = sorted(out.glob("checkpoint-*"))
        if not found:
            sys.exit(f"error: --resume: no checkpoint-* folder in {out}")
        path = found[-1]
    if not (path / "trainer_state.pt").exists():
        sys.exit(f"error: --resume: {path} is not a checkpoint (no trainer_state.pt)")
    return path


def resume_state(checkpoint: Path, model, optimizer, scheduler) -> tuple[int, dict]:
    """Load the optimizer, scheduler and RNG states of `checkpoint` (every rank reads the file; the weights
    were loaded with the model). Returns (step, data state)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["data_state"]
