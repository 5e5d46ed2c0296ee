"""A tiny, deterministic task ("fault-test") and a command-line entry for the fault-injection
tests of the sweep runner (tests/test_repro_faults.py).

Run as ``python tests/fault_sweep.py reproduce --task fault-test --preset smoke --out DIR
--set cells=4 ...``: the task is registered at import, so the runner's spawned workers (which
import this file as their ``__main__``) know it too. Each cell trains a 4-weight linear model
with SGD on random targets through the shared step loop (so it checkpoints, resumes and stops
on request like the real tasks); ``runtime`` knobs (not part of the cell id) slow it down:
``sleep`` seconds per step, and ``hang`` seconds after step ``hang_at`` of the cells whose seed
is in ``hang_seeds``. A cell appends ``<cell_id> <pid>`` to ``DIR/trained.log`` when it has
trained to completion, writes ``DIR/started-<cell_id>-<pid>`` at its first step, and appends
``<cell_id> <pid> <step> <CPU seconds>`` to ``DIR/steps.log`` after every optimizer step (the
compute a sweep spent, lost work included).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from bgnorm.repro.loop import StepLoop
from bgnorm.repro.tasks.base import TASKS, Task

NAME = "fault-test"


def cells(preset, overrides):
    s = overrides.get("set") or {}
    runtime = {"sleep": float(s.get("sleep", 0.0)), "hang": float(s.get("hang", 0.0)),
               "hang_at": int(s.get("hang_at", 1)), "hang_seeds": list(s.get("hang_seeds", []))}
    return [{"task": NAME, "seed": i, "steps": int(s.get("steps", 12)),
             "width": int(s.get("width", 4)), "runtime": runtime}
            for i in range(int(s.get("cells", 4)))]


def _append(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run(config, ctx):
    runtime = config.get("runtime") or {}
    out = Path(ctx.workdir).parent.parent
    torch.manual_seed(config["seed"])
    model = torch.nn.Linear(config["width"], 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hang = runtime.get("hang", 0.0) if config["seed"] in runtime.get("hang_seeds", []) else 0.0

    def update(step):
        if not getattr(update, "marked", False):  # once per process
            out.mkdir(parents=True, exist_ok=True)
            (out / f"started-{ctx.cell_id}-{os.getpid()}").touch()
            update.marked = True
        time.sleep(runtime.get("sleep", 0.0))
        cpu = time.thread_time()
        x = torch.randn(8, config["width"], dtype=torch.float64)  # resuming must restore RNG
        loss = ((model(x).squeeze(1) - x.sum(1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _append(out / "steps.log",
                f"{ctx.cell_id} {os.getpid()} {step} {time.thread_time() - cpu:.6f}\n")
        if hang and step + 1 == runtime.get("hang_at", 1):
            time.sleep(hang)
        return {"loss": loss.detach()}

    loop = StepLoop(ctx, config["steps"])
    m = loop.run({"model": model, "opt": opt}, update,
                 evaluate=lambda: {"metric": float(model.weight.detach().sum())})
    _append(out / "trained.log", f"{ctx.cell_id} {os.getpid()}\n")
    return {"acc": m["metric"], "curve": loop.curve, "losses": loop.losses}


def register():
    TASKS[NAME] = Task(NAME, ("smoke",), cells, run, lambda records, out: "",
                       title="fault injection")


register()

if __name__ == "__main__":
    from bgnorm.cli import main

    sys.exit(main(sys.argv[1:]))
