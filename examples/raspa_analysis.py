"""RASPA's analysis (Sec. 3, App. B) with this library's projections on a trained ResNet-20.

Trains a CIFAR-shaped ResNet-20 on the embedded digits upsampled to 3x32x32 (a few epochs on
CPU), then, layer by layer:

* **Table 3** (operational sequence, compression ratio 3.0 per layer, channel view
  ``(O, I*kh*kw)``, SVD as the low-rank method as in the paper):
  ``L+S``  = ``Sum(LowRank(r), Cardinality(density=0.1)).decompose(W)`` (alternating projections);
  ``S(L)`` = rank-``r`` factors ``U, V`` of ``W`` (``LowRank.factorize``), each pruned to
  density 0.9 (``Cardinality``);
  ``L(S)`` = ``LowRank(r).project(Cardinality(density=0.9).project(W))``.
  The ranks are the largest that fit ``numel / 3`` stored numbers (they reproduce the paper's
  ranks: 3/5/4 for 16x16x3x3, 6/10/9 for 32x32x3x3, 13/21/19 for 64x64x3x3).  One extra column,
  ``L+S (TT)``, uses RASPA's own choice (TTRank on the Eq. 9 view) at the same budget.
  Error = ``||W - W_hat||_F`` (and relative to ``||W||_F``).
* **Table 6** (low-rank format): feature-map MSE of each conv's output on 256 test images
  with the weight replaced by its SVD truncation (channel view) or its TT-SVD truncation
  (Eq. 9 view, ``d = 2``), both at compression ratio ~2.
* **Table 7**: for ``layer3.0.conv2``, SVD vs TT over compression ratios 1.5..4: feature-map
  MSE and test-accuracy change when only that layer is replaced (no fine-tuning; Tucker is not
  in this library and is left out).

Writes ``docs/results/raspa_analysis.md``.  Run: ``python examples/raspa_analysis.py``.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import admm_compress as ac
from admm_compress import data, models
from admm_compress.views import TTView

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results", "raspa_analysis.md")
CR = 3.0
DENSITY_LS = 0.1    # L+S keeps 10 % of the entries in S ("sparse 0.9" in Table 3)
DENSITY_SEQ = 0.9   # S(L), L(S) prune 10 % ("sparse 0.1")


def train(model, train_loader, test_loader, epochs=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * len(train_loader))
    for ep in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {ep}: test accuracy {accuracy(model, test_loader):.2f} %", file=sys.stderr)
    return model


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / total


def convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]


def fro(a):
    return float(torch.linalg.vector_norm(a.double()))


# ----------------------------------------------------------------- Table 3
def table3_row(W):
    O, I = W.shape[0], W.shape[1] * W.shape[2] * W.shape[3]
    mn, mpn = O * I, O + I
    budget = mn / CR
    W2 = W.reshape(O, I)
    r_ls = int((budget - DENSITY_LS * mn) // mpn)
    r_sl = int(budget // (DENSITY_SEQ * mpn))
    r_lss = int(budget // mpn)
    # L + S (SVD)
    L, S = ac.Sum(ac.LowRank(rank=r_ls), ac.Cardinality(density=DENSITY_LS)).decompose(W2, iters=200)
    e_ls = fro(W2 - L - S)
    n_ls = r_ls * mpn + round(DENSITY_LS * mn)
    # S(L): prune the low-rank factors
    U, V = ac.LowRank(rank=r_sl).factorize(W2)
    card = ac.Cardinality(density=DENSITY_SEQ)
    e_sl = fro(W2 - card.project(U) @ card.project(V))
    n_sl = round(DENSITY_SEQ * U.numel()) + round(DENSITY_SEQ * V.numel())
    # L(S): low rank of the pruned weight
    e_lss = fro(W2 - ac.LowRank(rank=r_lss).project(card.project(W2)))
    n_lss = r_lss * mpn
    # L + S with TT (RASPA's choice) at the same budget
    view = TTView.auto(W.shape, 2)
    vs = view.viewed_shape(W.shape)
    tt_budget = budget - DENSITY_LS * mn
    best = None
    for r1 in range(1, vs[0] + 1):
        for r2 in range(1, vs[-1] + 1):
            n = ac.TTRank((r1, r2)).num_params(vs)
            if n <= tt_budget and (best is None or n > best[0]):
                best = (n, (r1, r2))
    tt = ac.TTRank(best[1])
    Lt, St = ac.Sum(tt, ac.Cardinality(density=DENSITY_LS)).decompose(view.to(W), iters=100)
    e_tt = fro(view.to(W) - Lt - St)
    n_tt = best[0] + round(DENSITY_LS * mn)
    nw = fro(W)
    return dict(r_ls=r_ls, r_sl=r_sl, r_lss=r_lss, e_ls=e_ls, e_sl=e_sl, e_lss=e_lss, e_tt=e_tt, nw=nw,
                cr_ls=mn / n_ls, cr_sl=mn / n_sl, cr_lss=mn / n_lss, cr_tt=mn / n_tt, tt_ranks=best[1])


# ----------------------------------------------------------------- Tables 6-7
def svd_at(W, cr):
    O, I = W.shape[0], math.prod(W.shape[1:])
    r = max(1, int(O * I / cr // (O + I)))
    Wh = ac.LowRank(rank=r).project(W.reshape(O, I)).reshape(W.shape)
    return Wh, O * I / (r * (O + I)), r


def tt_at(W, cr):
    view = TTView.auto(W.shape, 2)
    vs = view.viewed_shape(W.shape)
    budget = W.numel() / cr
    best = None
    for r1 in range(1, vs[0] + 1):
        for r2 in range(1, vs[-1] + 1):
            n = ac.TTRank((r1, r2)).num_params(vs)
            if n <= budget and (best is None or n > best[0] or (n == best[0] and abs(r1 - r2) < abs(best[1][0] - best[1][1]))):
                best = (n, (r1, r2))
    tt = ac.TTRank(best[1])
    Wh = view.back(tt.project(view.to(W)), W.shape)
    return Wh, W.numel() / best[0], best[1]


@torch.no_grad()
def layer_io(model, name, x):
    mod = model.get_submodule(name)
    store = {}
    h = mod.register_forward_hook(lambda m, i, o: store.update(inp=i[0].detach(), out=o.detach()))
    model.eval()
    model(x)
    h.remove()
    return mod, store["inp"], store["out"]


@torch.no_grad()
def fmap_mse(mod, inp, out, Wh):
    y = F.conv2d(inp, Wh, mod.bias, mod.stride, mod.padding, mod.dilation)
    return float(((y - out) ** 2).mean()), float(((y - out) ** 2).sum() / (out ** 2).sum())


@torch.no_grad()
def acc_with(model, name, Wh, loader):
    mod = model.get_submodule(name)
    W = mod.weight.detach().clone()
    mod.weight.copy_(Wh)
    a = accuracy(model, loader)
    mod.weight.copy_(W)
    return a


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    train_loader, test_loader = data.digits32(batch_size=64, seed=0)
    model = train(models.resnet20(num_classes=10), train_loader, test_loader)
    base_acc = accuracy(model, test_loader)
    t_train = time.time() - t0
    xb = torch.cat([x for x, _ in test_loader])[:256]

    lines = ["# RASPA analysis: operational sequence and low-rank format (measured)", "",
             "Produced by `examples/raspa_analysis.py` (CPU, 1 thread).  Model: ResNet-20 (CIFAR "
             "variant, `admm_compress.models.resnet20`) trained for 4 epochs on the embedded digits "
             "upsampled to 3x32x32 (`data.digits32`, 1437 train / 360 test images); test accuracy "
             f"**{base_acc:.2f} %** (training took {t_train:.0f} s).  All 18 block convolutions are "
             "analysed (the stem `conv1` is left out, as in the paper's tables).", "",
             "## Table 3 analogue: approximation error at compression ratio 3.0 per layer", "",
             "Channel view `(O, I*kh*kw)`, SVD as the low-rank method (as in the paper's Table 3).  "
             "`L+S`: `Sum(LowRank(r), Cardinality(density=0.1)).decompose` (alternating projections, "
             "200 alternations); `S(L)`: rank-r factors `U sqrt(S)`, `sqrt(S) V^T` each pruned to "
             "density 0.9; `L(S)`: rank-r truncation of `W` pruned to density 0.9.  Ranks are the "
             "largest that store at most `numel/3` numbers (achieved ratio in brackets).  Error = "
             "`||W - W_hat||_F` (relative error in parentheses).  Extra column: `L+S` with the TT "
             "low-rank part (`TTRank` on RASPA's Eq. 9 view, d = 2) at the same budget.", "",
             "| layer | shape (O, I, kh, kw) | L+S rank | L+S error | S(L) rank | S(L) error | L(S) rank | "
             "L(S) error | L+S (TT) ranks | L+S (TT) error | smallest (SVD schemes) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    wins = 0
    tt_better = 0
    rows3 = []
    for name, m in convs(model):
        W = m.weight.detach().clone()
        r = table3_row(W)
        rows3.append(r)
        best = min(("L+S", r["e_ls"]), ("S(L)", r["e_sl"]), ("L(S)", r["e_lss"]), key=lambda t: t[1])[0]
        wins += best == "L+S"
        tt_better += r["e_tt"] < r["e_ls"]
        f = lambda e: f"{e:.3f} ({e / r['nw']:.3f})"  # noqa: E731
        lines.append(f"| {name} | {tuple(W.shape)} | {r['r_ls']} [{r['cr_ls']:.2f}x] | {f(r['e_ls'])} | "
                     f"{r['r_sl']} [{r['cr_sl']:.2f}x] | {f(r['e_sl'])} | {r['r_lss']} [{r['cr_lss']:.2f}x] | "
                     f"{f(r['e_lss'])} | {r['tt_ranks']} [{r['cr_tt']:.2f}x] | {f(r['e_tt'])} | {best} |")
    n = len(rows3)
    mean = lambda k: sum(r[k] / r["nw"] for r in rows3) / n  # noqa: E731
    lines += ["", f"L+S has the smallest error of the three SVD schemes in **{wins} of {n}** layers "
              f"(paper: all layers).  Mean relative error: L+S {mean('e_ls'):.3f}, S(L) {mean('e_sl'):.3f}, "
              f"L(S) {mean('e_lss'):.3f}; L+S with TT {mean('e_tt'):.3f} (TT below SVD in L+S in "
              f"{tt_better} of {n} layers).", ""]

    # Table 6
    lines += ["## Table 6 analogue: feature-map error, SVD vs TT at compression ratio ~2", "",
              "Each conv's weight alone is replaced by its SVD truncation (channel view) or its TT-SVD "
              "truncation (Eq. 9 view, d = 2, ranks (r1, r2) with the most parameters within the "
              "budget); the layer's output on 256 test images (its true input from the trained network) "
              "is compared with the original output.  MSE = mean squared difference; rel = "
              "`||Y - Y_hat||^2 / ||Y||^2`.", "",
              "| layer | shape | SVD ratio | TT ratio | SVD rank | TT ranks | SVD MSE (rel) | TT MSE (rel) | smaller |",
              "|---|---|---|---|---|---|---|---|---|"]
    tt_wins6 = 0
    for name, m in convs(model):
        mod, inp, out = layer_io(model, name, xb)
        W = mod.weight.detach()
        Ws, cs, rs = svd_at(W, 2.0)
        Wt, ct, rt = tt_at(W, 2.0)
        ms, rels = fmap_mse(mod, inp, out, Ws)
        mt, relt = fmap_mse(mod, inp, out, Wt)
        tt_wins6 += mt < ms
        lines.append(f"| {name} | {tuple(W.shape)} | {cs:.2f} | {ct:.2f} | {rs} | {rt} | {ms:.4g} ({rels:.3f}) | "
                     f"{mt:.4g} ({relt:.3f}) | {'TT' if mt < ms else 'SVD'} |")
    lines += ["", f"TT gives the smaller feature-map error in **{tt_wins6} of {n}** layers (paper: all).", ""]

    # Table 7
    name = "layer3.0.conv2"
    mod, inp, out = layer_io(model, name, xb)
    W = mod.weight.detach().clone()
    lines += [f"## Table 7 analogue: `{name}` {tuple(W.shape)}, SVD vs TT over compression ratios", "",
              f"Only this layer is replaced (no fine-tuning); accuracy change vs the trained model "
              f"({base_acc:.2f} %) on the 360 test images.  Tucker is not part of this library and is omitted.", "",
              "| target ratio | SVD ratio | SVD rank | SVD MSE | SVD acc. change (%) | TT ratio | TT ranks | TT MSE | TT acc. change (%) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cr in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        Ws, cs, rs = svd_at(W, cr)
        Wt, ct, rt = tt_at(W, cr)
        ms, _ = fmap_mse(mod, inp, out, Ws)
        mt, _ = fmap_mse(mod, inp, out, Wt)
        a_s = acc_with(model, name, Ws, test_loader) - base_acc
        a_t = acc_with(model, name, Wt, test_loader) - base_acc
        lines.append(f"| {cr} | {cs:.2f} | {rs} | {ms:.4g} | {a_s:+.2f} | {ct:.2f} | {rt} | {mt:.4g} | {a_t:+.2f} |")
    lines += ["", f"Total run time {time.time() - t0:.0f} s.", ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {os.path.normpath(OUT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
