"""Crash safety of ``Solver.fit(..., checkpoint=)``: SIGKILL, resume, and interrupted writes.

A worker process (``tests/_kill_worker.py``: an MLP with dropout on the embedded digits, ADMM
low rank with mid-epoch Z/U updates, a geometric rho schedule, an LR scheduler, a validation
loader and two fine-tuning epochs; one CPU thread) is killed with SIGKILL at a random point and
rerun from its checkpoint until it finishes.  The final weights and the whole history (without
wall-clock times) must be *bit-identical* to an uninterrupted run: the checkpoint restores the
model, optimizer, scheduler, solver state (Z, U, rho, step counters, residuals) and the RNG
states of torch and of the loader's generator.  A checkpoint write interrupted half-way must
never replace the last good checkpoint.
"""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress import data
from admm_compress.training import CheckpointError, load_checkpoint, save_checkpoint

WORKER = Path(__file__).resolve().parent / "_kill_worker.py"
_RNG = random.Random()  # kill points differ between runs on purpose; each is printed on failure


def _start(tmp: Path, ck: Path, out: Path, **env) -> subprocess.Popen:
    e = dict(os.environ, OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    err = tmp / f"stderr-{len(list(tmp.glob('stderr-*')))}.txt"
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, str(WORKER), str(ck), str(out)], cwd=tmp, env=e,
                             stdout=subprocess.PIPE, stderr=f, text=True)
    p.err_path = err
    return p


def _finish(p: subprocess.Popen) -> None:
    p.stdout.read()
    assert p.wait(timeout=120) == 0, f"worker failed:\n{p.err_path.read_text()}"


def _kill_after(p: subprocess.Popen, marker: str, delay: float, count: int = 1) -> None:
    """SIGKILL ``p`` ``delay`` seconds after its ``count``-th output line equal to ``marker``."""
    seen = 0
    for line in p.stdout:
        if line.strip() == marker:
            seen += 1
            if seen == count:
                break
    else:
        p.wait(timeout=120)
        pytest.fail(f"worker ended (rc={p.returncode}) before printing {marker!r} x{count}:\n"
                    f"{p.err_path.read_text()}")
    if delay:
        time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL, "the worker finished before it could be killed"


def _assert_same(out: Path, ref: dict, note: str) -> None:
    got = torch.load(out, weights_only=True)
    assert got["model"].keys() == ref["model"].keys()
    for k in ref["model"]:
        assert torch.equal(got["model"][k], ref["model"][k]), f"{note}: weight {k} differs"
    assert got["history"] == ref["history"], f"{note}: history differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights and history of an uninterrupted worker run.

    Returns a function: the run starts at once, in parallel with the test's own workers, and the
    function waits for it.
    """
    tmp = tmp_path_factory.mktemp("ref")
    p = _start(tmp, tmp / "ck.pt", tmp / "out.pt")
    cache: dict = {}

    def get() -> dict:
        if not cache:
            _finish(p)
            cache.update(torch.load(tmp / "out.pt", weights_only=True))
            assert [r["phase"] for r in cache["history"]["epochs"]] == ["train"] * 3 + ["finetune"] * 2
        return cache

    yield get
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def one_thread():
    """In-process training on one thread (fast and deterministic on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sigkill_inside_a_write_and_at_a_random_point_then_resume_is_bit_identical(tmp_path, reference):
    ck, out = tmp_path / "ck.pt", tmp_path / "out.pt"
    # 1) the 2nd torch.save (after epoch 1) writes half of its bytes and hangs: SIGKILL there
    p = _start(tmp_path, ck, out, KILL_WORKER_HANG_AT_SAVE=2)
    for line in p.stdout:
        if line.strip() == "SAVE_HALF":
            break
    else:
        pytest.fail(f"worker ended (rc={p.wait()}) without reaching its 2nd save:\n{p.err_path.read_text()}")
    good = ck.read_bytes()  # the complete checkpoint of epoch 0, written before this save began
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert ck.read_bytes() == good, "an interrupted write replaced the last good checkpoint"
    assert load_checkpoint(ck)["epoch"] == 1
    partial = glob.glob(str(tmp_path / ".ck.pt.tmp-*.pt"))
    assert len(partial) == 1, "the half-written temporary file should be left beside it"
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(partial[0])
    # 2) resume with 10 ms per batch (an epoch of 23 batches + validation lasts ~0.3 s) and
    #    SIGKILL at a random point after the first fine-tuning epoch: mid-epoch, between epochs
    #    or inside a checkpoint write, wherever the delay falls
    delay = _RNG.uniform(0.0, 0.4)
    note = f"second kill {delay:.3f} s after fine-tuning epoch 0"
    _kill_after(_start(tmp_path, ck, out, KILL_WORKER_SLEEP=0.01), "EPOCH finetune 0", delay)
    assert load_checkpoint(ck)["phase"] == "finetune", note
    # 3) resume to the end
    _finish(_start(tmp_path, ck, out))
    _assert_same(out, reference(), note)
    assert not glob.glob(str(tmp_path / ".ck.pt.tmp-*.pt")), "stale temp files were not cleaned up"


@pytest.mark.slow
def test_sigkill_during_training_then_resume_is_bit_identical(tmp_path, reference):
    """A kill at a random point of the ADMM phase (slow: one more worker run)."""
    ck, out = tmp_path / "ck.pt", tmp_path / "out.pt"
    delay = _RNG.uniform(0.0, 0.4)
    _kill_after(_start(tmp_path, ck, out, KILL_WORKER_SLEEP=0.01), "EPOCH train 0", delay)
    assert ck.exists()
    _finish(_start(tmp_path, ck, out))
    _assert_same(out, reference(), f"kill {delay:.3f} s after training epoch 0")


# ------------------------------------------------------------------ in-process
def _half_then_fail(real_save):
    def save(obj, f, *a, **k):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("No space left on device (simulated)")
    return save


def test_failed_write_raises_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.arange(5.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"a": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["ck.pt"], "the temporary file must be removed after a failure"


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    solver = ac.Solver([ac.Constrain("0", ac.LowRank(rank=3))], rho=0.05, every=5)
    return model, solver


def test_fit_whose_checkpoint_write_fails_keeps_last_good(tmp_path, monkeypatch, one_thread):
    train, _ = data.digits(batch_size=128, seed=0)
    ck = tmp_path / "ck.pt"
    model, solver = _tiny()
    solver.fit(model, train, epochs=1, checkpoint=ck, progress=False)
    good = ck.read_bytes()
    model, solver = _tiny()
    monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    with pytest.raises(OSError, match="No space left"):
        solver.fit(model, train, epochs=3, checkpoint=ck, progress=False)
    assert ck.read_bytes() == good
    assert load_checkpoint(ck)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_resume_in_process_equals_uninterrupted(tmp_path, one_thread):
    """Stop after 2 of 4 epochs (a callback), resume in a fresh model and solver: same weights."""
    model, solver = _tiny()
    solver.fit(model, data.digits(batch_size=128, seed=0)[0], epochs=4, progress=False)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ck = tmp_path / "ck.pt"
    model, solver = _tiny()
    solver.fit(model, data.digits(batch_size=128, seed=0)[0], epochs=4, checkpoint=ck, progress=False,
               callbacks=[lambda s, m, rec: rec["epoch"] == 1])  # stops after epoch 1 (finalizes)
    assert load_checkpoint(ck)["epoch"] == 2
    model, solver = _tiny()
    torch.manual_seed(123)  # the resumed run must restore the torch and loader RNG states itself
    solver.fit(model, data.digits(batch_size=128, seed=0)[0], epochs=4, checkpoint=ck, progress=False)
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["numeric", "settle"])
def test_rerun_of_a_finished_fit_returns_its_result(tmp_path, one_thread, kind):
    """A fit run again on the checkpoint of its last fine-tuning epoch (a job restarted after it
    finished, or killed between that checkpoint and its exit) returns the fine-tuned weights and
    the same history -- it once returned the weights of the final projection instead, because
    the checkpoint's weights were loaded only before an epoch and none was left to run."""
    def make():
        if kind == "numeric":
            return _tiny()
        torch.manual_seed(0)  # rho="auto" + settle="auto": settle and fine-tuning stages after finalize
        return (nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
                ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]))

    train, test = data.digits(batch_size=128, seed=0)
    ck = tmp_path / "ck.pt"
    model, solver = make()
    h1 = solver.fit(model, train, epochs=4, finetune_epochs=2, val_loader=test, checkpoint=ck, progress=False)
    assert load_checkpoint(ck)["phase"] == "finetune"
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model, solver = make()
    torch.manual_seed(123)
    h2 = solver.fit(model, train, epochs=4, finetune_epochs=2, val_loader=test, checkpoint=ck, progress=False)
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall"} for r in h.epochs]  # noqa: E731
    assert strip(h2) == strip(h1) and h2.final["after_finetune"] == h1.final["after_finetune"]


def test_a_successful_write_removes_temp_files_of_interrupted_writes_to_the_same_path(tmp_path):
    from admm_compress.training import load_checkpoint, save_checkpoint

    stale = tmp_path / ".ck.pt.tmp-abc123.pt"          # left by a writer killed mid-write
    stale.write_bytes(b"half a pickle")
    other = tmp_path / ".other.pt.tmp-xyz.pt"          # another checkpoint's temp file: not ours
    other.write_bytes(b"x")
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "ck.pt")
    assert not stale.exists() and other.exists()
    assert torch.equal(load_checkpoint(tmp_path / "ck.pt")["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.tmp-xyz.pt", "ck.pt"]
