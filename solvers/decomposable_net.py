"""Decomposable-Net (papers/002): joint loss (1 - lam) f(W) + lam f(Pi_r(W)) with a sampled global
rank ratio; after training any size is exported (here ``export_ratio``) with BN recomputed."""
REQUIRES = ["admm_compress.methods.decomposable_net"]
NAME = "decomposable_net"
DESCRIPTION = "Decomposable-Net: joint full/low-rank loss, global singular-value rank selection"
# export_ratio 0.1 is below ResNet-20's per-layer floors (min_rank 5 of 16 bases: >= 0.138)
PARAMS = {"export_ratio": [0.15, 0.25, 0.5], "lam": [0.5]}
DEFAULTS = {"rank_ratio": (0.01, 0.25), "lam": 0.5, "criterion": "global", "scheme": "channel",
            "export_ratio": 0.25, "min_rank": 5, "rank_rule": "official"}


def build(problem, rank_ratio, lam, criterion, scheme, export_ratio, min_rank, rank_rule="official"):
    from admm_compress.methods.decomposable_net import decomposable_net

    from admm_compress._validation import check_float

    # export_ratio is used only after training (export): check it now
    check_float("export_ratio", export_ratio, low=0.0, high=1.0, low_open=True, where="decomposable_net")
    keep = list(problem.keep_dense) if problem is not None else []
    return decomposable_net(tuple(rank_ratio), lam, criterion=criterion, scheme=scheme,
                            min_rank=min_rank, exclude=keep or None, rank_rule=rank_rule,
                            export_ratio=export_ratio)


def export(solver, model, problem, export_ratio, **_):
    """The compact model at ``export_ratio`` of the pooled bases, BN statistics recomputed on the
    whole training loader (footnote 1)."""
    return solver.export(model, rank_ratio=export_ratio, input_size=problem.input_size,
                         bn_loader=problem.train_loader)
