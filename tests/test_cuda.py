"""The same end-to-end paths on every available device: CPU always, CUDA where a GPU exists.

Each test is parametrized over ``DEVICES``: on the build machines (no GPU) only the ``cpu``
cases run, which keeps the test logic itself exercised; on a GPU machine the ``cuda`` cases run
the real CUDA paths: training with Z/U on the device, export and complexity of a CUDA model,
CUDA latency (synchronized), float16 autocast with a GradScaler, the CLI with ``--device cuda``
and, with two GPUs, ``--nproc 2`` over NCCL.  Run just these with ``pytest tests/test_cuda.py``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress import methods

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def _model(dev, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).to(dev)


def _data(n=4, b=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


SOLVERS = {
    "lowrank": lambda: ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(rank=2))], rho=0.1),
    "channels": lambda: ac.Solver([ac.Constrain("3", ac.Cardinality(k=4, group_dim=1), view="identity")], rho=0.1),
    "tt": lambda: ac.Solver([ac.Constrain("3", ac.TTRank((2, 2)), view=ac.views.TTView((2, 4), (2, 4)))], rho=0.1),
    "lrpet": lambda: methods.lrpet(0.5),
    "raspa": lambda: methods.raspa((2, 2), density=0.2, rho=0.1, targets="3"),
    "lorita": lambda: methods.lorita(2, 1e-4, targets=nn.Conv2d, rank=2),
    "decomposable_net": lambda: methods.decomposable_net((0.3, 0.6), min_rank=2, targets=nn.Conv2d),
    # rho="auto": the run is too short for an ADMM part, every epoch settles with the factors'
    # ScaledGD gradient hooks (eigvalsh / solve on the device)
    "lowrank_auto": lambda: ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(rank=2))]),
    "tt_auto": lambda: ac.Solver([ac.Constrain("3", ac.TTRank((2, 2)), view=ac.views.TTView((2, 4), (2, 4)))]),
}


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_fit_and_export_on_the_device(name, dev):
    model = _model(dev)
    solver = SOLVERS[name]()
    hist = solver.fit(model, _data(), epochs=2, device=dev, progress=False, lr=0.02)
    losses = torch.tensor(hist.column("loss", "train"))
    assert torch.isfinite(losses).all()
    assert all(p.device.type == dev for p in model.parameters())
    for store in (getattr(solver, "Z", {}), getattr(solver, "U", {})):
        for k, t in store.items():
            assert t.device.type == dev, k
    model.eval()
    compact = (solver.export(model, rank_ratio=0.5) if name == "decomposable_net"
               else ac.export(model, solver)).eval()
    assert all(p.device.type == dev for p in compact.parameters())
    x = torch.randn(5, 3, 8, 8, device=dev)
    with torch.no_grad():
        y = compact(x)
        assert y.device.type == dev and torch.isfinite(y).all()
        if name not in ("decomposable_net",):  # DN exports a size chosen at export time
            torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-3)
    c = ac.complexity(compact, (3, 8, 8))
    assert 0 < c.macs < ac.complexity(_model(dev), (3, 8, 8)).macs
    lat = ac.latency(compact, (3, 8, 8), batch=4, repeats=3, warmup=1)
    assert 0 < lat.median


@pytest.mark.parametrize("dev", DEVICES)
def test_float16_autocast_trains_with_a_grad_scaler(dev, monkeypatch):
    model = _model(dev, classes=10)
    train, _ = ac.data.digits32(batch_size=64, size=8)
    made = []

    class Spy(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(rank=2))], rho=0.1)
    hist = solver.fit(model, train, epochs=3, device=dev, progress=False, autocast=torch.float16, lr=0.05)
    loss = hist.column("loss", "train")
    assert len(made) == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0]
    assert all(solver.finalize(model).values())


def _cli(*args, timeout=600):
    exe = shutil.which("admm-compress")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "admm_compress", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


TINY = ["--epochs", "1", "--set", "pretrain_epochs=1", "--set", "finetune_epochs=1", "--no-progress",
        "--latency-repeats", "3", "--latency-batch", "4"]


@pytest.mark.parametrize("dev", DEVICES)
def test_cli_run_on_the_device(dev, tmp_path):
    out = tmp_path / "run"
    p = _cli("run", "digits_fcn", "lrpet", "--device", dev, "--out", str(out), *TINY)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["device"].startswith(dev) and res["latency_after_ms"] > 0 and res["acc_after"] > 20


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices for NCCL")
def test_cli_two_processes_over_nccl(tmp_path):
    p = _cli("run", "digits_fcn", "lrpet", "--device", "cuda", "--nproc", "2", "--out", str(tmp_path / "two"), *TINY)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "two" / "results.json").read_text())["nproc"] == 2


@pytest.mark.parametrize("dev", DEVICES)
def test_batched_scaled_gd_hooks_on_the_device(dev):
    """``precondition``'s batched hooks (one ``eigvalsh`` / ``lu_factor_ex`` per Gram size, a
    ``lu_solve`` per factor) on the device equal the one-factor maps computed on the CPU, in
    float64: both solve damped systems of condition number <= 101, so they agree to ~1e-13
    whatever the device's LAPACK; a wrong slice of the batch is off by O(1)."""
    from _helpers import scaled_gd_mixed_model
    from admm_compress.parametrizations import factor_grad_maps, precondition, release

    net, solver, x = scaled_gd_mixed_model()  # low rank (two ranks), TT cores and L + S, structured

    def grads(model, inp):
        model.zero_grad(set_to_none=True)
        model(inp).pow(2).sum().backward()
        return [p.grad.detach().cpu().clone() for p in model.parameters()]

    plain = grads(net, x)
    ids = [id(p) for p in net.parameters()]
    want = {id(t): fn(plain[ids.index(id(t))]) for b in solver.bindings for t, fn in factor_grad_maps(b)}
    net.to(dev)
    handles = precondition(solver.bindings)
    got = grads(net, x.to(dev))
    assert len(want) == 2 + 3 + 3 + 2 + 2  # U, V / three TT cores / L's three cores / U, V / U, V
    for i, p in enumerate(net.parameters()):
        w = want.get(id(p), plain[i])
        torch.testing.assert_close(got[i], w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
    for h in handles:
        h.remove()
    release(solver.bindings)
