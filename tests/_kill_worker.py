"""Worker process of ``tests/test_kill_resume.py`` (not a test module: no ``test_`` prefix).

Trains a small MLP with dropout on the embedded digits with ``Solver.fit(..., checkpoint=)``
(ADMM, low rank, Z/U updates every 7 steps so they land mid-epoch, geometric rho schedule, an
LR scheduler, a validation loader and two fine-tuning epochs), deterministically on one CPU
thread, and writes the final ``state_dict`` and the history (without wall times) to ``OUT``.  Run again with the same checkpoint it
resumes from there.

Usage: ``python tests/_kill_worker.py CHECKPOINT OUT``

Environment
-----------
KILL_WORKER_SLEEP : float
    Seconds slept in every training batch (so a kill lands mid-epoch); 0 by default.
KILL_WORKER_HANG_AT_SAVE : int
    The ``n``-th ``torch.save`` writes the first half of its bytes, prints ``SAVE_HALF`` and hangs
    (until the test kills it inside that checkpoint write); 0 (never) by default.

Prints one ``EPOCH <phase> <epoch>`` line per finished epoch (before its checkpoint is written)
and ``DONE`` at the end, flushed, so the test can time its kills.
"""
import io
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(1)

import admm_compress as ac  # noqa: E402
from admm_compress import data  # noqa: E402

EPOCHS, FINETUNE_EPOCHS = 3, 2


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    spec = [ac.Constrain(nn.Linear, ac.LowRank(rank=4), exclude="5")]
    solver = ac.Solver(spec, rho=0.05, every=7, rho_growth=1.2, rho_max=1.0)
    return model, solver


def main(checkpoint: str, out: str) -> None:
    sleep = float(os.environ.get("KILL_WORKER_SLEEP", "0"))
    hang_at = int(os.environ.get("KILL_WORKER_HANG_AT_SAVE", "0"))
    real_save = torch.save
    if hang_at > 0:
        calls = []

        def save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) < hang_at:
                return real_save(obj, f, *a, **k)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            print("SAVE_HALF", flush=True)
            time.sleep(600)  # killed here

        torch.save = save

    train, test = data.digits(batch_size=64, seed=0)
    model, solver = build()

    def loss_fn(out, y):
        if sleep > 0:
            time.sleep(sleep)
        return F.cross_entropy(out, y)

    def report(solver, model, rec):
        print(f"EPOCH {rec['phase']} {rec['epoch']}", flush=True)

    history = solver.fit(model, train, epochs=EPOCHS, finetune_epochs=FINETUNE_EPOCHS, val_loader=test,
               loss_fn=loss_fn, lr=0.05, checkpoint=checkpoint, callbacks=[report], progress=False,
               optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
               scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    hist = history.to_dict()
    for rec in hist["epochs"]:
        rec.pop("wall", None)  # seconds: the only entry that may differ between runs
    real_save({"model": model.state_dict(), "history": hist}, out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
