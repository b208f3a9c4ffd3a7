"""ADMM with default arguments against ``torch.nn.utils.prune`` (and SVD truncation) at equal budget.

The question (issue 14): does ``ac.Solver(spec).fit(...)`` with nothing tuned beat "train, cut,
fine-tune" as a user would run it?  Every comparison starts from the same pretrained dense model
(per seed) and spends the same epochs after pretraining with the same optimizer (SGD, momentum
0.9, weight decay 5e-4) and the same LR schedule: ``E - F`` epochs at ``lr``, then ``F`` epochs at
``lr / 10``.

* peer, sparse: ``prune.l1_unstructured`` per layer ("prune_layer") or
  ``prune.global_unstructured`` ("prune_global") to the density, then masked fine-tuning (the
  pruning masks stay as forward pre-hooks) for all ``E`` epochs;
* peer, low rank: every weight replaced by its truncated SVD (Eckart-Young), then the rank-r
  factors fine-tuned (``admm_compress.structure``) for ``E`` epochs ("svd");
* ours: ``ac.Solver([ac.Constrain(targets, set)]).fit(model, train, epochs=E - F,
  finetune_epochs=F, lr=lr)`` -- default arguments only ("admm_auto"; "admm_auto_every10" with
  ``every=10``; "admm_auto_global" with ``Cardinality(density, scope="global")``, one budget over
  every target layer, the like-for-like counterpart of "prune_global"; for the sparse rows the default ``settle="auto"`` spends the second half of the
  ``E - F`` epochs on the mask at lr, for the low-rank rows the last 0.8 of them on the factors
  at min(lr, 0.03) with ScaledGD-preconditioned gradients, see ``Solver``), and a hand-tuned numeric rho grid ("admm_rho=<r>", constant rho) to see how far
  the default is from its own best.  ``before_finalize`` / ``after_finalize`` are fit's history
  entries: measured with BatchNorm statistics recomputed on the training data (fit does that for
  the ADMM solver; the running averages lag the weights the penalty shrinks).

After a change of the solver, drop its cached runs and re-run them (the peers stay cached)::

    python benchmarks/admm_vs_prune.py --parts resnet_sparse --seeds 0 --forget resnet20:admm

Problems: the digits FCN-8 (``models.fcn(depth=8, width=96)``, every Linear) and the digits32
ResNet-20 (every Conv2d and Linear).  Accuracy is measured on the test split after the whole
budget.  Results are appended to a JSON-lines cache (``--cache``) so a run can be split and
resumed; the Markdown report is written from the cache.

Run (everything that fits the small shared CPU in ~15 min; see ``--help``)::

    python benchmarks/admm_vs_prune.py --parts fcn_sparse fcn_lowrank fcn_tuned fcn_robust fcn_cadence overhead
    python benchmarks/admm_vs_prune.py --parts resnet_sparse resnet_cadence bn_lag --seeds 0
    python benchmarks/admm_vs_prune.py --report-only --note "..."
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import admm_compress as ac  # noqa: E402
from admm_compress import data, models  # noqa: E402
from admm_compress.registry import train_dense  # noqa: E402
from admm_compress.training import NonFiniteError, evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "results", "admm_vs_prune.md")
CACHE = os.path.join(ROOT, "docs", "results", "admm_vs_prune.jsonl")

PROBLEMS = {
    # name: (loaders, model, pretrain epochs, epochs after pretraining E, of which fine-tuning F, targets)
    "fcn": dict(make=lambda: models.fcn(depth=8, width=96, in_features=64, num_classes=10),
                data=lambda seed: data.digits(batch_size=64, seed=seed), pretrain=30, E=20, F=5,
                targets=(nn.Linear,)),
    "resnet20": dict(make=lambda: models.resnet20(num_classes=10),
                     data=lambda seed: data.digits32(batch_size=64, seed=seed), pretrain=4, E=4, F=1,
                     targets=(nn.Conv2d, nn.Linear)),
}

_pretrained: dict = {}


def pretrained(problem: str, seed: int):
    """(model, train, test) with the model trained densely; the same weights per (problem, seed)."""
    P = PROBLEMS[problem]
    key = (problem, seed)
    if key not in _pretrained:
        torch.manual_seed(seed)
        model = P["make"]()
        pre_train, pre_test = P["data"](seed)  # its own loaders: their shuffling state is used up here
        train_dense(model, pre_train, P["pretrain"], lr=0.05, progress=False)
        _pretrained[key] = (copy.deepcopy(model.state_dict()), evaluate(model, pre_test)["accuracy"])
    train, test = P["data"](seed)  # fresh loaders: every method sees the same batch order
    torch.manual_seed(seed)
    model = P["make"]()
    model.load_state_dict(_pretrained[key][0])
    torch.manual_seed(seed + 1000)  # the same shuffling for every method of this seed
    return model, train, test, _pretrained[key][1]


def _layers(model, targets):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, targets)]


def two_phase(model, train, E, F, lr):
    """The shared schedule: ``E - F`` epochs at lr, then ``F`` at lr / 10 (masks/factors kept by the caller)."""
    if E - F > 0:
        train_dense(model, train, E - F, lr=lr, progress=False)
    if F > 0:
        train_dense(model, train, F, lr=lr / 10, progress=False)


def run_prune(problem, seed, lr, density, scope):
    P = PROBLEMS[problem]
    model, train, test, dense = pretrained(problem, seed)
    layers = _layers(model, P["targets"])
    if scope == "global":
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=1.0 - density)
    else:
        for _, m in layers:
            prune.l1_unstructured(m, "weight", amount=1.0 - density)
    after_cut = evaluate(model, test)["accuracy"]
    two_phase(model, train, P["E"], P["F"], lr)
    for _, m in layers:
        prune.remove(m, "weight")
    nnz = sum(int(torch.count_nonzero(m.weight)) for _, m in layers)
    tot = sum(m.weight.numel() for _, m in layers)
    assert nnz <= round(density * tot) + len(layers), (nnz, tot)
    return {"acc": evaluate(model, test)["accuracy"], "after_cut": after_cut, "dense": dense}


def run_svd(problem, seed, lr, ratio):
    from admm_compress.structure import release, structure

    P = PROBLEMS[problem]
    model, train, test, dense = pretrained(problem, seed)
    solver = ac.Solver(spec_for(problem, "lowrank", ratio), mode="projection")
    solver.prepare(model)
    solver.finalize(model)
    after_cut = evaluate(model, test)["accuracy"]
    state = copy.deepcopy(model.state_dict())
    used_lr = lr
    for attempt in (lr, lr / 10):  # factor fine-tuning of a deep net can diverge at the dense lr;
        used_lr = attempt            # a user would then lower it, so the peer gets that retry
        model.load_state_dict(state)
        structure(solver.bindings)
        try:
            two_phase(model, train, P["E"], P["F"], attempt)
            if evaluate(model, test)["accuracy"] > 20.0:  # not collapsed to chance
                break
        except NonFiniteError:
            continue
        finally:
            release(solver.bindings)
    else:
        return {"acc": 10.0, "after_cut": after_cut, "dense": dense, "diverged": True, "peer_lr": used_lr}
    return {"acc": evaluate(model, test)["accuracy"], "after_cut": after_cut, "dense": dense, "peer_lr": used_lr}


def spec_for(problem, kind, amount, scope="layer"):
    P = PROBLEMS[problem]
    # one instance for every target: with scope="global" the conv and linear layers share one budget
    cset = ac.Cardinality(density=amount, scope=scope) if kind == "sparse" else ac.LowRank(ratio=amount)
    specs = []
    for t in P["targets"]:
        view = {"view": "channel"} if (t is nn.Conv2d and kind == "lowrank") else {}
        specs.append(ac.Constrain(t, cset, **view))
    return specs


def run_admm(problem, seed, lr, kind, amount, scope="layer", **solver_kw):
    P = PROBLEMS[problem]
    model, train, test, dense = pretrained(problem, seed)
    solver = ac.Solver(spec_for(problem, kind, amount, scope), **solver_kw)
    t0 = time.perf_counter()
    try:
        h = solver.fit(model, train, epochs=P["E"] - P["F"], finetune_epochs=P["F"], lr=lr, val_loader=test,
                       progress=False)
    except NonFiniteError:  # recorded as the user would see it: the run stopped, chance accuracy
        return {"acc": 10.0, "before_finalize": float("nan"), "after_finalize": float("nan"),
                "projection_distance": float("nan"), "final_primal": None, "rho_first": None, "rho_last": None,
                "dense": dense, "wall": time.perf_counter() - t0, "diverged": True}
    rhos = [u["rho"] for u in h.updates]
    return {"acc": h.final["after_finetune"]["accuracy"], "before_finalize": h.final["before_finalize"]["accuracy"],
            "after_finalize": h.final["after_finalize"]["accuracy"], "projection_distance": h.final["projection_distance"],
            "final_primal": h.updates[-1]["primal"] if h.updates else None,
            "rho_first": rhos[0] if rhos else None, "rho_last": rhos[-1] if rhos else None,
            "dense": dense, "wall": time.perf_counter() - t0}


def bn_lag(seed=0, density=0.1, rho=0.1, lr=0.05):
    """Why ResNet-20 read ~10 % before the final projection: one ADMM epoch (constant ``rho``, no
    finalize) from the pretrained model, then the conv weights' norm against the start,
    the running variances against recomputed ones (``recalibrate_bn`` over the whole training
    loader), and the test accuracy in eval mode with each."""
    from admm_compress.training import recalibrate_bn

    model, train, test, dense = pretrained("resnet20", seed)
    w0 = {n: m.weight.detach().norm() for n, m in _layers(model, (nn.Conv2d,))}
    solver = ac.Solver(spec_for("resnet20", "sparse", density), rho=rho)  # a numeric rho: no calibration step
    solver.prepare(model)  # a hand-written loop (fit's optimizer and schedule), stopped before finalize
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in train:
        loss = nn.functional.cross_entropy(model(x), y) + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        solver.step()
    solver.epoch_end()
    shrink = [float(m.weight.detach().norm() / w0[n]) for n, m in _layers(model, (nn.Conv2d,))]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    run_var = [b.running_var.clone() for b in bns]
    acc_eval = evaluate(model, test)["accuracy"]
    recalibrate_bn(model, train, batches=None)
    lag = [float((rv / b.running_var.clamp_min(1e-12)).median()) for rv, b in zip(run_var, bns)]
    return {"acc": evaluate(model, test)["accuracy"], "acc_running_stats": acc_eval, "dense": dense,
            "norm_ratio_min": min(shrink), "norm_ratio_max": max(shrink), "var_lag_min": min(lag),
            "var_lag_max": max(lag), "rho": rho}


def overhead(rounds=11, epochs=3):
    """CPU seconds per optimizer step of ``fit`` with ``rho="auto"`` and with a numeric rho (0.1),
    digits FCN-8, density 0.1, Z/U every 10 steps; runs interleaved over ``rounds``; medians."""
    train, _ = data.digits(batch_size=64, seed=0)
    batches = list(train)
    per = {"auto": [], "0.1": []}
    for i in range(rounds):
        for rho in (["auto", "0.1"] if i % 2 == 0 else ["0.1", "auto"]):
            torch.manual_seed(0)
            model = PROBLEMS["fcn"]["make"]()
            solver = ac.Solver(spec_for("fcn", "sparse", 0.1), rho=rho if rho == "auto" else float(rho), every=10)
            t0 = time.process_time()
            solver.fit(model, batches, epochs=epochs, lr=0.05, progress=False)
            per[rho].append((time.process_time() - t0) / (epochs * len(batches)))
    a, n = statistics.median(per["auto"]), statistics.median(per["0.1"])
    return {"step_auto_ms": 1e3 * a, "step_numeric_ms": 1e3 * n, "ratio": a / n, "rounds": rounds,
            "steps": epochs * len(batches)}


# ----------------------------------------------------------------------------- parts
def part_jobs(part, seeds, lrs, rho_grid):
    """(key, fn) pairs of one part; ``key`` identifies the run in the cache."""
    jobs = []
    base_lr = lrs[0] if part.endswith(("_sparse", "_lowrank", "_tuned")) else None
    if part in ("fcn_sparse", "resnet_sparse"):
        prob = "fcn" if part.startswith("fcn") else "resnet20"
        dens = (0.1, 0.05) if prob == "fcn" else (0.2, 0.1)
        for d in dens:
            for s in seeds:
                for scope in ("layer", "global"):
                    jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=base_lr, method=f"prune_{scope}"),
                                 lambda prob=prob, s=s, d=d, scope=scope: run_prune(prob, s, base_lr, d, scope)))
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=base_lr, method="admm_auto"),
                             lambda prob=prob, s=s, d=d: run_admm(prob, s, base_lr, "sparse", d)))
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=base_lr, method="admm_auto_global"),
                             lambda prob=prob, s=s, d=d: run_admm(prob, s, base_lr, "sparse", d, "global")))
    elif part in ("fcn_lowrank", "resnet_lowrank"):
        prob = "fcn" if part.startswith("fcn") else "resnet20"
        for s in seeds:
            jobs.append((dict(problem=prob, kind="lowrank", amount=0.25, seed=s, lr=base_lr, method="svd"),
                         lambda prob=prob, s=s: run_svd(prob, s, base_lr, 0.25)))
            jobs.append((dict(problem=prob, kind="lowrank", amount=0.25, seed=s, lr=base_lr, method="admm_auto"),
                         lambda prob=prob, s=s: run_admm(prob, s, base_lr, "lowrank", 0.25)))
    elif part in ("fcn_lowrank_robust", "resnet_lowrank_robust"):  # the low-rank comparison at every lr
        prob = "fcn" if part.startswith("fcn") else "resnet20"
        for lr in lrs:
            for s in seeds:
                jobs.append((dict(problem=prob, kind="lowrank", amount=0.25, seed=s, lr=lr, method="svd"),
                             lambda prob=prob, s=s, lr=lr: run_svd(prob, s, lr, 0.25)))
                jobs.append((dict(problem=prob, kind="lowrank", amount=0.25, seed=s, lr=lr, method="admm_auto"),
                             lambda prob=prob, s=s, lr=lr: run_admm(prob, s, lr, "lowrank", 0.25)))
    elif part in ("fcn_robust", "resnet_robust"):
        prob = "fcn" if part.startswith("fcn") else "resnet20"
        d = 0.1 if prob == "fcn" else 0.2
        for lr in lrs:
            for s in seeds:
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=lr, method="prune_layer"),
                             lambda prob=prob, s=s, lr=lr: run_prune(prob, s, lr, d, "layer")))
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=lr, method="prune_global"),
                             lambda prob=prob, s=s, lr=lr: run_prune(prob, s, lr, d, "global")))
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=lr, method="admm_auto"),
                             lambda prob=prob, s=s, lr=lr: run_admm(prob, s, lr, "sparse", d)))
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=lr, method="admm_auto_every10"),
                             lambda prob=prob, s=s, lr=lr: run_admm(prob, s, lr, "sparse", d, every=10)))
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=lr, method="admm_auto_global"),
                             lambda prob=prob, s=s, lr=lr: run_admm(prob, s, lr, "sparse", d, "global")))
    elif part == "resnet_short":  # the ADMM part the short-run rule drops, kept (settle=0.5: the old default)
        for d, lr in ((0.2, 0.05), (0.2, 0.1), (0.2, 0.01), (0.1, 0.05)):
            for s in seeds:
                for scope, m in (("layer", "admm_keep_admm"), ("global", "admm_keep_admm_global")):
                    jobs.append((dict(problem="resnet20", kind="sparse", amount=d, seed=s, lr=lr, method=m),
                                 lambda s=s, d=d, lr=lr, scope=scope: run_admm("resnet20", s, lr, "sparse", d, scope,
                                                                              settle=0.5)))
    elif part in ("fcn_cadence", "resnet_cadence"):  # Z/U every 10 steps at the main lr, both densities
        prob = "fcn" if part.startswith("fcn") else "resnet20"
        for d in ((0.1, 0.05) if prob == "fcn" else (0.1, 0.2)):
            for s in seeds:
                jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=lrs[0], method="admm_auto_every10"),
                             lambda prob=prob, s=s, d=d: run_admm(prob, s, lrs[0], "sparse", d, every=10)))
    elif part in ("fcn_tuned", "resnet_tuned"):
        prob = "fcn" if part.startswith("fcn") else "resnet20"
        for d in ((0.1, 0.05) if prob == "fcn" else (0.2,)):
            for rho in rho_grid:
                for s in seeds:
                    jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=base_lr, method=f"admm_rho={rho:g}"),
                                 lambda prob=prob, s=s, d=d, rho=rho: run_admm(prob, s, base_lr, "sparse", d, rho=rho)))
                    # the same constant rho with the default's schedule (settle=0.5): only rho differs
                    jobs.append((dict(problem=prob, kind="sparse", amount=d, seed=s, lr=base_lr,
                                      method=f"admm_settle_rho={rho:g}"),
                                 lambda prob=prob, s=s, d=d, rho=rho: run_admm(prob, s, base_lr, "sparse", d, rho=rho,
                                                                                 settle=0.5)))
    elif part == "bn_lag":
        jobs.append((dict(problem="resnet20", kind="sparse", amount=0.1, seed=seeds[0], lr=0.05, method="bn_lag"),
                     lambda: bn_lag(seeds[0])))
    elif part == "overhead":
        jobs.append((dict(problem="fcn", kind="sparse", amount=0.1, seed=0, lr=0.05, method="overhead"),
                     overhead))
    else:
        raise SystemExit(f"unknown part {part!r}")
    return jobs


def _key(d):
    return json.dumps({k: d[k] for k in ("problem", "kind", "amount", "seed", "lr", "method")}, sort_keys=True)


def load_cache(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out[_key(r)] = r
    return out


# ----------------------------------------------------------------------------- report
def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _seeds(seeds) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2, 5"``."""
    out, run = [], []
    for s in sorted(seeds):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return ", ".join(out)


def _fmt(xs):
    if not xs:
        return "not run"
    m = _mean(xs)
    return f"{m:.2f} ({', '.join(f'{x:.1f}' for x in xs)})"


def paired_section(rows, sel) -> list[str]:
    """Default minus peer per seed (same pretrained model, same seed), mean and its standard error
    ``sd / sqrt(n)`` over the seeds both have: whether the seeds resolve the difference at all."""
    pairs = (("sparse", "admm_auto", "prune_layer"), ("sparse", "admm_auto_global", "prune_global"),
             ("lowrank", "admm_auto", "svd"))
    out = ["", "## Paired differences: default - peer on the same seeds (mean +- standard error)", "",
           "Per seed both runs start from the same pretrained model, so the per-seed difference removes "
           "the pretraining's spread.  *resolved*: |mean| >= 2 standard errors (about a 95 % interval "
           "excluding 0); otherwise these seeds cannot tell the two apart.", "",
           "| problem | constraint | lr | default | peer | n | default - peer | standard error | resolved? |",
           "|---|---|---|---|---|---|---|---|---|"]
    for prob, kind, amount, lr in sorted({(r["problem"], r["kind"], r["amount"], r["lr"]) for r in rows
                                          if r["kind"] in ("sparse", "lowrank") and r["method"] == "admm_auto"},
                                         key=lambda t: (t[0], t[1], -t[2], -t[3])):
        for k, ours, peer in pairs:
            if k != kind:
                continue
            a = {r["seed"]: r["acc"] for r in sel(problem=prob, kind=kind, amount=amount, lr=lr, method=ours)}
            b = {r["seed"]: r["acc"] for r in sel(problem=prob, kind=kind, amount=amount, lr=lr, method=peer)}
            common = sorted(set(a) & set(b))
            if len(common) < 2:
                continue
            d = [a[x] - b[x] for x in common]
            m = _mean(d)
            se = statistics.stdev(d) / len(d) ** 0.5
            what = f"density {amount:g}" if kind == "sparse" else f"LowRank(ratio={amount:g})"
            verdict = ("yes: default ahead" if m > 0 else "yes: **peer ahead**") if abs(m) >= 2 * se else "no"
            out.append(f"| {prob} | {what} | {lr:g} | {ours} | {peer} | {len(d)} | {m:+.2f} | {se:.2f} | {verdict} |")
    return out


def report(cache, out, note):
    rows = list(cache.values())

    def sel(**kw):
        return sorted((r for r in rows if all(r.get(k) == v for k, v in kw.items())), key=lambda r: r["seed"])

    lines = ["# ADMM with default arguments vs torch.nn.utils.prune / SVD truncation (issue 14)", "",
             f"Written by `benchmarks/admm_vs_prune.py` on {datetime.date.today()} ({platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)).  {note}", "",
             "Test accuracy (%) after the whole budget, mean over seeds (per-seed values in brackets).  "
             "Same pretrained model per seed; same epochs after pretraining, optimizer (SGD, momentum 0.9, "
             "weight decay 5e-4) and schedule (E - F epochs at lr, F at lr/10) for every method.  "
             "`admm_auto` = `ac.Solver([ac.Constrain(types, set)]).fit(model, train, epochs=E-F, "
             "finetune_epochs=F, lr=lr)` with nothing else set: rho='auto'; settle='auto' (sparse sets: ADMM "
             "for E' = E - F - ceil((E - F) / 2) epochs -- FCN 7 --, the final projection, then "
             "the kept entries trained at lr for the other ceil((E - F) / 2); low rank: ADMM for E' = E - F - "
             "ceil(0.8 (E - F)) epochs -- FCN 3 --, then the factors trained with ScaledGD's "
             "preconditioned gradients at min(lr, 0.03) (Solver.preconditioned_settle_lr_scale='auto', since "
             "2026-12-04, eleventh session; tenth session: 0.3 lr; before, plain gradients at lr/10) and "
             "everything else at lr; ResNet-20: none, since 2026-12-03 (fourth session) -- its one ADMM epoch of 23 "
             "steps has no room for Solver.min_admm_updates = 3 dual updates 20 steps apart, so all E - F epochs "
             "settle from the projection of the pretrained weights; before, 1 ADMM epoch); every='auto' (once per "
             "epoch, or every E'*len(loader)//10 steps when E' < 10 but at least "
             "20 steps -- heavy-ball's response time at momentum 0.9 -- and at most an epoch: every 20 of the 23 "
             "steps per epoch in every run here); BatchNorm "
             "statistics recomputed by fit around the final projection and after fine-tuning.  'before / "
             "after final projection' is at the end of the ADMM epochs.", ""]
    problems = sorted({(r["problem"], r["kind"], r["amount"]) for r in rows if r["lr"] == 0.05})
    lines += ["## Main comparison (lr 0.05, default Z/U cadence every='auto')", "",
              "| problem | constraint | peer | peer acc | admm_auto acc | admm before / after final projection (BN stats recomputed) | "
              "dense | default >= peer? |", "|---|---|---|---|---|---|---|---|"]
    for prob, kind, amount in problems:
        ours = sel(problem=prob, kind=kind, amount=amount, lr=0.05, method="admm_auto")
        if not ours:
            continue
        peers = ["prune_layer", "prune_global"] if kind == "sparse" else ["svd"]
        what = f"density {amount:g}" if kind == "sparse" else f"LowRank(ratio={amount:g})"
        for p in peers:
            pr = sel(problem=prob, kind=kind, amount=amount, lr=0.05, method=p)
            if not pr:
                continue
            oa, pa = [r["acc"] for r in ours], [r["acc"] for r in pr]
            ba = _mean([r["before_finalize"] for r in ours])
            aa = _mean([r["after_finalize"] for r in ours])
            ok = "yes" if _mean(oa) >= _mean(pa) else "**no**"
            lines.append(f"| {prob} | {what} | {p} | {_fmt(pa)} | {_fmt(oa)} | {ba:.1f} / {aa:.1f} | "
                         f"{_mean([r['dense'] for r in ours]):.1f} | {ok} |")
    # robustness
    rob = [r for r in rows if r["method"] in ("admm_auto", "admm_auto_every10", "prune_layer", "prune_global")
           and r["kind"] == "sparse"]
    lrs = sorted({r["lr"] for r in rob}, reverse=True)
    lines += ["", "## Robustness: learning rate and Z/U cadence (sparse)", "",
              "| problem | density | lr | prune_layer | prune_global | admm_auto (default cadence) | admm_auto every=10 |",
              "|---|---|---|---|---|---|---|"]
    for prob, amount in sorted({(r["problem"], r["amount"]) for r in rob}):
        for lr in lrs:
            cells = [_fmt([r["acc"] for r in sel(problem=prob, kind="sparse", amount=amount, lr=lr, method=m)])
                     for m in ("prune_layer", "prune_global", "admm_auto", "admm_auto_every10")]
            if all(c == "not run" for c in cells[2:]):
                continue
            lines.append(f"| {prob} | {amount:g} | {lr:g} | " + " | ".join(cells) + " |")
    # like for like: the per-layer budget against per-layer pruning, the shared budget
    # (Cardinality(scope="global")) against global pruning, on the seeds both have
    glob = [r for r in rows if r["method"] == "admm_auto_global"]
    if glob:
        lines += ["", "## Like for like: per-layer budget vs prune_layer, shared budget vs prune_global (sparse)", "",
                  "`admm_auto` is `Cardinality(density=d)` (every layer keeps d of its entries, what "
                  "`prune.l1_unstructured` does per layer); `admm_auto_global` is `Cardinality(density=d, "
                  "scope=\"global\")` (one budget of d of all the bound entries, conv and linear together, what "
                  "`prune.global_unstructured` does), otherwise the same default solver.  Means on the seeds "
                  "both columns of a pair have.", "",
                  "| problem | density | lr | prune_layer | admm_auto | diff (seeds) | prune_global | admm_auto_global "
                  "| diff (seeds) |", "|---|---|---|---|---|---|---|---|---|"]
        for prob, amount, lr in sorted({(r["problem"], r["amount"], r["lr"]) for r in glob}, key=lambda t: (t[0], -t[1], -t[2])):
            acc = {m: {r["seed"]: r["acc"] for r in sel(problem=prob, kind="sparse", amount=amount, lr=lr, method=m)}
                   for m in ("prune_layer", "admm_auto", "prune_global", "admm_auto_global")}
            cells = []
            for peer, ours in (("prune_layer", "admm_auto"), ("prune_global", "admm_auto_global")):
                common = set(acc[peer]) & set(acc[ours])
                if not common:
                    cells += ["not run"] * 3
                    continue
                pm, om = _mean([acc[peer][x] for x in common]), _mean([acc[ours][x] for x in common])
                cells += [f"{pm:.2f}", f"{om:.2f}", f"{om - pm:+.2f} ({_seeds(common)})"]
            lines.append(f"| {prob} | {amount:g} | {lr:g} | " + " | ".join(cells) + " |")
    short = [r for r in rows if r["method"] in ("admm_keep_admm", "admm_keep_admm_global")]
    if short:
        lines += ["", "## The short-run rule: the ADMM part dropped (default) or kept (settle=0.5)", "",
                  "ResNet-20, 3 epochs on the set (23 steps each) + 1 fine-tuning: `settle=0.5` keeps the "
                  "one ADMM epoch the default had before the rule (one Z/U update), the default now settles "
                  "every epoch from the projection of the pretrained weights.  Same machine and seeds.", "",
                  "| density | lr | budget | peer | ADMM part dropped (default) | kept (settle=0.5) | "
                  "dropped - kept | default - peer | kept - peer |", "|---|---|---|---|---|---|---|---|---|"]
        for d, lr in sorted({(r["amount"], r["lr"]) for r in short}, key=lambda t: (-t[0], -t[1])):
            for scope, m, dm, pm in (("per layer", "admm_keep_admm", "admm_auto", "prune_layer"),
                                     ("shared", "admm_keep_admm_global", "admm_auto_global", "prune_global")):
                kept, dflt, peer = ({r["seed"]: r["acc"] for r in sel(problem="resnet20", kind="sparse", amount=d,
                                                                      lr=lr, method=x)} for x in (m, dm, pm))
                sd = sorted(set(kept) & set(dflt) & set(peer))
                if not sd:
                    continue
                k, a, p_ = (_mean([x[s] for s in sd]) for x in (kept, dflt, peer))
                lines.append(f"| {d:g} | {lr:g} | {scope} | {p_:.2f} | {a:.2f} | {k:.2f} | {a - k:+.2f} | "
                             f"{a - p_:+.2f} | {k - p_:+.2f} |")
    lrob = [r for r in rows if r["kind"] == "lowrank" and r["method"] in ("svd", "admm_auto")]
    if len({r["lr"] for r in lrob}) > 1:
        lines += ["", "## Robustness: learning rate (low rank, LowRank(ratio=0.25))", "",
                  "| problem | lr | svd + factor fine-tuning (lr used) | admm_auto | default >= peer? |",
                  "|---|---|---|---|---|"]
        for prob in sorted({r["problem"] for r in lrob}):
            for lr in sorted({r["lr"] for r in lrob}, reverse=True):
                pr = sel(problem=prob, kind="lowrank", lr=lr, method="svd")
                ou = sel(problem=prob, kind="lowrank", lr=lr, method="admm_auto")
                if not pr or not ou:
                    continue
                used = "/".join(sorted({f"{r.get('peer_lr', lr):g}" for r in pr}))
                div = sum(bool(r.get("diverged")) for r in ou)
                ok = "yes" if _mean([r["acc"] for r in ou]) >= _mean([r["acc"] for r in pr]) else "**no**"
                lines.append(f"| {prob} | {lr:g} | {_fmt([r['acc'] for r in pr])} ({used}) | "
                             f"{_fmt([r['acc'] for r in ou])}{f' ({div} diverged)' if div else ''} | {ok} |")
    lines += paired_section(rows, sel)
    # tuned
    tuned = [r for r in rows if r["method"].startswith(("admm_rho=", "admm_settle_rho="))]
    if tuned:
        methods = sorted({r['method'] for r in tuned}, key=lambda m: ("settle" in m, float(m.split('=')[1])))
        lines += ["", "## The default against its own hand-tuned rho (constant rho grid, lr 0.05, default cadence: "
                  "per epoch with a numeric rho; admm_settle_rho: the same with settle=0.5, the default's schedule)", "",
                  "| problem | density | admm_auto | " + " | ".join(methods)
                  + " | best tuned - auto |", "|---|---|---|" + "---|" * len(methods) + "---|"]
        for prob, amount in sorted({(r["problem"], r["amount"]) for r in tuned}):
            runs = {m: {r["seed"]: r["acc"] for r in sel(problem=prob, kind="sparse", amount=amount, lr=0.05, method=m)}
                    for m in ["admm_auto"] + methods}
            # the difference on the seeds every column has (a column with more seeds is not compared
            # against one with fewer)
            common = set.intersection(*(set(v) for v in runs.values() if v))
            best = max((_mean([v[s] for s in common]) for m, v in runs.items() if v and m != "admm_auto"),
                       default=float("nan"))
            diff = (best - _mean([runs["admm_auto"][s] for s in common]) if common and runs["admm_auto"]
                    else float("nan"))
            cells = [_fmt([runs[m][s] for s in sorted(runs[m])]) for m in methods]
            lines.append(f"| {prob} | {amount:g} | {_fmt([runs['admm_auto'][s] for s in sorted(runs['admm_auto'])])} | "
                         + " | ".join(cells) + f" | {diff:+.2f} (seeds {_seeds(common)}) |")
    ov = [r for r in rows if r["method"] == "overhead"]
    if ov:
        r = ov[-1]
        lines += ["", "## Overhead of the adaptive rule", "",
                  f"CPU time per optimizer step of `fit` (digits FCN-8, density 0.1, Z/U every 10 steps, "
                  f"{r['steps']} steps per run, median of {r['rounds']} interleaved runs): rho='auto' "
                  f"{r['step_auto_ms']:.3f} ms, rho=0.1 {r['step_numeric_ms']:.3f} ms, ratio "
                  f"**{r['ratio']:.3f}**.  After the first step the rule costs one boolean test per step "
                  f"and a few scalar operations per Z/U update."]
    lag = [r for r in rows if r["method"] == "bn_lag"]
    if lag:
        r = lag[-1]
        lines += ["", "## Why ResNet-20 read ~10 % before the final projection (part bn_lag)", "",
                  f"One ADMM epoch from the pretrained ResNet-20 (seed {r['seed']}, density {r['amount']:g}, constant "
                  f"rho {r['rho']:g}, lr {r['lr']:g}, no BN recalibration): every conv weight's norm fell to "
                  f"{r['norm_ratio_min']:.2f}-{r['norm_ratio_max']:.2f} of its start (a conv followed by BN has a "
                  f"scale-invariant loss; the penalty shrinks it), the running variances were "
                  f"{r['var_lag_min']:.2f}-{r['var_lag_max']:.2f}x (median per layer) the recomputed ones, and the "
                  f"test accuracy read {r['acc_running_stats']:.1f} % with the running statistics against "
                  f"{r['acc']:.1f} % with recomputed ones.  Hence `fit` recomputes them for the ADMM solver."]
    # rho trace
    autos = [r for r in rows if r["method"].startswith("admm_auto")]
    if autos:
        lines += ["", "## What rho='auto' did (mean over the runs of each setting)", "",
                  "| problem | constraint | lr | method | rho first update | rho last update | final primal "
                  "||W-Z||/||W|| | projection distance | acc before / after final projection |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for prob, kind, amount, lr, m in sorted({(r["problem"], r["kind"], r["amount"], r["lr"], r["method"]) for r in autos}):
            rs = [r for r in sel(problem=prob, kind=kind, amount=amount, lr=lr, method=m) if not r.get("diverged")]
            if not rs:
                continue
            def opt(key, fmt, rs=rs):  # None: no Z/U update ran (settle="auto" dropped the ADMM part)
                xs = [r[key] for r in rs if r[key] is not None]
                return format(_mean(xs), fmt) if xs else "no update"
            lines.append(f"| {prob} | {kind} {amount:g} | {lr:g} | {m} | {opt('rho_first', '.3g')} | "
                         f"{opt('rho_last', '.3g')} | {opt('final_primal', '.2e')} | "
                         f"{_mean([r['projection_distance'] for r in rs]):.2e} | "
                         f"{_mean([r['before_finalize'] for r in rs]):.1f} / {_mean([r['after_finalize'] for r in rs]):.1f} |")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="*", default=["fcn_sparse", "fcn_lowrank", "fcn_robust", "fcn_tuned"],
                    help="fcn_sparse fcn_lowrank fcn_lowrank_robust fcn_robust fcn_cadence fcn_tuned overhead bn_lag "
                         "resnet_sparse resnet_lowrank resnet_lowrank_robust resnet_robust resnet_cadence "
                         "resnet_tuned resnet_short")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--lrs", nargs="*", type=float, default=[0.05, 0.1, 0.01],
                    help="the first is the main comparison's lr; all are used by the *_robust parts")
    ap.add_argument("--rho-grid", nargs="*", type=float, default=[1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new runs after this many seconds")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default="", help="text added to the report header (e.g. what was not run)")
    ap.add_argument("--forget", nargs="*", default=[], metavar="PROBLEM:METHOD_PREFIX[:KIND]",
                    help="drop these runs from the cache before running (e.g. resnet20:admm after a change of "
                         "the solver, fcn:admm:lowrank for the low-rank runs only: the peers' cached runs stay "
                         "valid; a METHOD ending in $ is matched exactly: resnet20:admm_auto$); the cache file "
                         "is rewritten")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cache = load_cache(args.cache)
    if args.forget:
        rules = [f.split(":") for f in args.forget]
        if any(len(r) not in (2, 3) for r in rules):
            raise SystemExit("--forget takes PROBLEM:METHOD_PREFIX[:KIND], e.g. resnet20:admm or fcn:admm:lowrank")
        drop = [k for k, r in cache.items()
                if any(r["problem"] == ru[0] and (r["method"] == ru[1][:-1] if ru[1].endswith("$")
                                                  else r["method"].startswith(ru[1]))
                       and (len(ru) == 2 or r["kind"] == ru[2]) for ru in rules)]
        for k in drop:
            del cache[k]
        tmp = args.cache + ".tmp"
        with open(tmp, "w") as f:
            for r in cache.values():
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, args.cache)
        print(f"forgot {len(drop)} cached run(s)", flush=True)
    t0 = time.perf_counter()
    if not args.report_only:
        for part in args.parts:
            for meta, fn in part_jobs(part, args.seeds, args.lrs, args.rho_grid):
                if _key(meta) in cache:
                    continue
                if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
                    print(f"budget of {args.budget_s:g} s spent; stopping before {meta}", flush=True)
                    break
                t1 = time.perf_counter()
                res = fn()
                rec = {**meta, **res, "wall_total": time.perf_counter() - t1}
                cache[_key(rec)] = rec
                with open(args.cache, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{part}: {meta['problem']} {meta['kind']} {meta['amount']} seed {meta['seed']} lr "
                      f"{meta['lr']} {meta['method']}: {res.get('acc', res.get('ratio')):.3f} "
                      f"({rec['wall_total']:.0f} s)", flush=True)
    print(report(cache, args.out, args.note))


if __name__ == "__main__":
    main()
