"""PNG plots of a compression run (matplotlib, non-interactive ``Agg`` backend).

* :func:`accuracy_vs_macs` — test accuracy against MACs, one point per model (dense reference
  and compressed models), the usual compression trade-off view;
* :func:`singular_spectra` — per-layer singular values of the ``(out, in*kh*kw)`` weight matrix
  before and after compression (what the low-rank methods act on);
* :func:`residuals` — ADMM primal ``||W - Z|| / ||W||`` and dual ``rho ||Z_k - Z_{k-1}||``
  residuals per epoch (Boyd et al. 2011, Sec. 3.3), the convergence check of the solver;
* :func:`tradeoff` — accuracy against MACs drop (%) for the rows of a benchmark.

Every function writes one PNG and returns its path.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["accuracy_vs_macs", "singular_spectra", "residuals", "tradeoff", "pareto_front", "weight_spectra"]

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int = 110) -> str:
    """Lay out, write and close ``fig``; returns the path written."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return os.fspath(path)


@torch.no_grad()
def weight_spectra(model: nn.Module, max_layers: int | None = None) -> dict[str, list[float]]:
    """Singular values of every Conv / Linear weight seen as ``(out, in*kh*kw)``, by layer name.

    Parametrized weights (factor products, ``L + S``) are evaluated through the parametrization,
    so this reads the effective weight.
    """
    out: dict[str, list[float]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = m.weight.detach()
            mat = w.reshape(w.shape[0], -1).to(torch.float64).cpu()
            out[name] = torch.linalg.svdvals(mat).tolist()
            if max_layers is not None and len(out) >= max_layers:
                break
    return out


def accuracy_vs_macs(points: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> str:
    """Scatter of ``accuracy`` (%) against ``macs`` for ``points`` (dicts with ``label``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        if p.get("macs") is None or p.get("accuracy") is None:
            continue
        ax.scatter(p["macs"] / 1e6, p["accuracy"], s=40, marker=p.get("marker", "o"))
        ax.annotate(p["label"], (p["macs"] / 1e6, p["accuracy"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("MACs (M, ptflops pytorch backend)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs MACs")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def singular_spectra(before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]],
                     path: str | os.PathLike, max_layers: int = 12, title: str = "") -> str:
    """One panel per layer: singular values (log scale) before and after compression."""
    plt = _plt()
    names = [n for n in before if n in after][:max_layers] or list(before)[:max_layers]
    n = max(1, len(names))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        b = [max(v, 1e-12) for v in before[name]]
        ax.semilogy(range(1, len(b) + 1), b, label="before", lw=1.5)
        if name in after:
            a = [max(v, 1e-12) for v in after[name]]
            ax.semilogy(range(1, len(a) + 1), a, label="after", lw=1.5, ls="--")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "singular values per layer (index vs sigma_i)", fontsize=10)
    return _save(fig, path, dpi=100)


def residuals(epochs: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> str:
    """Primal / dual residuals per training epoch (records of :class:`admm_compress.History`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    recs = [e for e in epochs if e.get("phase", "train") == "train" and "primal" in e]
    if recs:
        x = list(range(1, len(recs) + 1))
        ax.semilogy(x, [max(r["primal"], 1e-16) for r in recs], marker="o", ms=3, label="primal ||W-Z||/||W||")
        if any(r.get("dual", 0) > 0 for r in recs):
            ax.semilogy(x, [max(r.get("dual", 0.0), 1e-16) for r in recs], marker="s", ms=3,
                        label="dual rho||Z_k - Z_k-1||")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no ADMM residuals recorded\n(this solver has no Z/U splitting)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("residual")
    ax.set_title(title or "ADMM residuals per epoch")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def tradeoff(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "",
             x: str = "macs_drop", y: str = "acc_after", x_min: float | None = -25.0) -> str:
    """Benchmark trade-off: ``y`` (accuracy after, %) against ``x`` (MACs drop, %).

    One marker per solver and parameter setting (``row["setting"]``, optional): the mean over
    seeds, bars = min/max.  A solver swept over several settings (``bench --grid``) gets its
    Pareto front drawn as a line through the settings no other setting of it beats in both
    MACs drop and accuracy.  Settings whose mean ``x`` is below ``x_min`` (e.g. TT layers that
    cost more MACs than the dense ones) would squash the axis: they are left out of the plot and
    counted in a note on it (``x_min=None`` shows everything)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    by: dict[str, dict[str, list[Mapping]]] = {}
    for r in rows:
        if r.get(x) is None or r.get(y) is None:
            continue
        by.setdefault(r["solver"], {}).setdefault(str(r.get("setting", "")), []).append(r)
    hidden: dict[str, int] = {}
    if x_min is not None:
        for solver in list(by):
            for key in list(by[solver]):
                rs = by[solver][key]
                if sum(float(r[x]) for r in rs) / len(rs) < x_min:
                    hidden[solver] = hidden.get(solver, 0) + 1
                    del by[solver][key]
            if not by[solver]:
                del by[solver]
    markers = "osD^v<>pPX*h"
    colors = plt.get_cmap("tab20").colors
    for i, (solver, settings) in enumerate(sorted(by.items())):
        # tab20: the 10 saturated colors first, then their light partners
        color, marker = colors[(2 * i) % 20 + (i // 10) % 2], markers[i % len(markers)]
        pts = []
        for rs in settings.values():
            xs = [float(r[x]) for r in rs]
            ys = [float(r[y]) for r in rs]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            # clamped: the mean of equal values can land an ulp outside [min, max]
            yerr = [[max(0.0, my - min(ys))], [max(0.0, max(ys) - my)]]
            ax.errorbar([mx], [my], yerr=yerr, fmt=marker, ms=7, capsize=3, color=color,
                        label=solver if not pts else None)
            pts.append((mx, my))
        if len(pts) > 1:
            front = pareto_front(pts)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=color, alpha=0.6)
    if hidden:
        ax.text(0.01, 0.01, f"not shown (MACs drop < {x_min:g} %): "
                + ", ".join(f"{s} x{n}" for s, n in sorted(hidden.items())),
                transform=ax.transAxes, fontsize=7, va="bottom", ha="left", color="0.35")
    ax.set_xlabel("MACs drop (%)")
    ax.set_ylabel("test accuracy after compression (%)")
    ax.set_title(title or "accuracy vs MACs drop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (both maximized), sorted by the first."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in points)]
    return sorted(set(front))
