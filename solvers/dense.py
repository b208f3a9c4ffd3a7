"""Baseline: dense training, no compression (the reference for accuracy, MACs and training time)."""
from admm_compress.registry import Baseline

NAME = "dense"
KIND = "baseline"
DESCRIPTION = "dense training (no compression): the reference row"
PARAMS = {}
DEFAULTS = {}


class Dense(Baseline):
    def compress(self, model, loader):
        pass


def build(problem):
    return Dense()
