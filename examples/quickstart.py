"""Quick start in code: LRPET on LoRITa's FCN with the embedded digits (about 10 s on a CPU)."""
import torch
from torch import nn

import admm_compress as ac
from admm_compress import data, methods, models

torch.manual_seed(0)
train, test = data.digits(batch_size=64)                              # embedded, offline
model = models.fcn(depth=8, width=96)
solver = methods.lrpet(pruning_ratio=0.75, targets=nn.Linear, exclude="layers.7", bn_rectification=False)
solver.fit(model, train, epochs=30, val_loader=test, finetune_epochs=5)   # rank int(n - nP) per layer
compact = ac.export(model, solver.spec)                               # Linear -> Linear(in, r) + Linear(r, out)
before, after = ac.complexity(models.fcn(), (64,)), ac.complexity(compact, (64,))
drop = after.reduction(before)                                        # percent drops vs the dense model
print(f"accuracy {ac.evaluate(compact, test)['accuracy']:.2f} %, MACs -{drop['macs']:.1f} %, params -{drop['params']:.1f} %")
