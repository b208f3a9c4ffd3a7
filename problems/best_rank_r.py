"""Best rank-r approximation: min_X 0.5 ||X - A||_F^2 s.t. rank(X) <= r.

Known answer (Eckart-Young-Mirsky): the truncated SVD ``A_r = sum_{i<=r} s_i u_i v_i^T``, unique
when ``s_r > s_{r+1}``.  The admm solvers must reach it: it proves the W-step / Z-step / U-step
loop converges to the constrained optimum, not just to a feasible point.
"""
import torch

import admm_compress as ac
from admm_compress.registry import MatrixProblemModel, Problem

NAME = "best_rank_r"
DESCRIPTION = "exact: min 0.5||X - A||^2 s.t. rank(X) <= r; answer = truncated SVD (Eckart-Young)"
DEFAULTS = {"epochs": 30, "m": 30, "n": 20, "rank": 3, "steps_per_epoch": 10, "lr": 0.2, "tolerance": 1e-3}


def _loss(out, target):
    return 0.5 * (out - target).pow(2).sum()


def build(seed, device, epochs, m, n, rank, steps_per_epoch, lr, tolerance):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if not rank < min(m, n):
        raise ValueError(f"best_rank_r: rank={rank} must be < min(m, n)={min(m, n)}")
    answer = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    batches = [(torch.zeros(1, dtype=torch.float64), A)] * steps_per_epoch
    model = MatrixProblemModel(m, n).to(device)
    return Problem(NAME, model, batches, batches, (1,), loss_fn=_loss, epochs=epochs, lr=lr,
                   optimizer=lambda p: torch.optim.SGD(p, lr=lr), task="exact",
                   known_answer={"x.weight": answer.to(device)}, tolerance=tolerance,
                   spec=[ac.Constrain("x", ac.LowRank(rank=rank))], accepts=("lowrank",),
                   solver_defaults={"rho": 0.5, "rho_growth": 1.2, "rho_max": 5.0},
                   answer_fn=lambda mdl: {"x.weight": mdl.x.weight},
                   answer_checks=lambda mdl: {f"rank <= {rank}": int(torch.linalg.matrix_rank(mdl.x.weight.detach())) <= rank},
                   meta={"m": m, "n": n, "rank": rank, "gap": float(S[rank - 1] - S[rank])})
