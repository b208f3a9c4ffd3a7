"""Compact state dict of exported unstructured sparse layers: values + the smallest support
encoding, loaded back bit for bit; the stored bytes obey the stated bound."""
import io
import math

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress import storage
from admm_compress.layers import SparseConv1d, SparseConv2d, SparseLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32, 300)
        self.fc2 = nn.Linear(300, 10, bias=False)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _spec(density):
    return [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=density), view="identity")]


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _bytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("shape", [(7, 20), (6, 4, 3, 3), (300, 32), (5, 3, 2), (1, 1), (40, 1000)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_every_encoding_decodes_to_the_support_and_the_smallest_is_chosen(shape, density):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) < density
    sizes = {}
    for fmt in storage.SUPPORT_KEYS:
        f, enc = storage.encode_support(mask, fmt)
        assert f == fmt and set(enc) == set(storage.SUPPORT_KEYS[fmt])
        assert torch.equal(storage.decode_support(fmt, enc, shape), mask)
        sizes[fmt] = sum(_bytes(t) for t in enc.values())
    fmt, enc = storage.encode_support(mask)
    assert sum(_bytes(t) for t in enc.values()) == min(sizes.values())
    # the bitmask is one bit per entry, never more than ceil(n / 8) bytes
    assert sizes["bitmask"] == math.ceil(mask.numel() / 8)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.3])
def test_state_dict_holds_values_and_index_only_and_reloads_bit_exactly(density):
    torch.manual_seed(0)
    compact = ac.export(Net().eval(), _spec(density)).eval()
    sd = compact.state_dict()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert f"{name}.weight" not in sd and f"{name}.mask" not in sd
        layer = getattr(compact, name)
        assert sd[f"{name}.weight_values"].numel() == layer.nnz
        assert torch.equal(sd[f"{name}.weight_values"], layer.weight[layer.mask != 0])
    # a freshly exported model of the same structure, from *other* weights (other supports)
    torch.manual_seed(1)
    fresh = ac.export(Net().eval(), _spec(density)).eval()
    assert not torch.equal(fresh.fc1.mask, compact.fc1.mask)
    fresh.load_state_dict(_roundtrip(sd))  # strict: no missing / unexpected keys
    for (k, a), (k2, b) in zip(compact.named_parameters(), fresh.named_parameters()):
        assert k == k2 and torch.equal(a, b), k
    for (k, a), (_, b) in zip(compact.named_buffers(), fresh.named_buffers()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(fresh(x), compact(x))
    assert ac.complexity(fresh, (3, 10, 10)).macs == ac.complexity(compact, (3, 10, 10)).macs


def test_stored_bytes_bound_and_well_under_half_of_dense():
    """Per layer: values (nnz * 4 bytes) + index <= 4 d n + ceil(n / 8) (the bitmask bound);
    the whole model at density 0.1 stores < 1/2 of the dense state dict."""
    torch.manual_seed(0)
    dense = Net().eval()
    compact = ac.export(dense, _spec(0.1)).eval()
    sd = compact.state_dict()
    for row in storage.storage_report(compact):
        n, k = math.prod(row["shape"]), row["nnz"]
        layer_bytes = sum(_bytes(t) for key, t in sd.items() if key.startswith(row["name"] + ".weight_"))
        assert layer_bytes == row["value_bytes"] + row["index_bytes"]
        assert row["value_bytes"] == 4 * k
        assert row["index_bytes"] <= math.ceil(n / 8)
    assert storage.storage_bytes(compact) < 0.5 * storage.storage_bytes(dense)
    assert storage.storage_bytes(compact) == sum(_bytes(t) for t in sd.values())
    assert storage.saved_bytes(compact) > storage.storage_bytes(compact)  # container overhead on top


def test_zeros_inside_the_support_and_empty_or_full_masks_survive():
    torch.manual_seed(0)
    for mask in (torch.zeros(5, 8, dtype=torch.bool), torch.ones(5, 8, dtype=torch.bool),
                 torch.rand(5, 8) < 0.4):
        layer = SparseLinear(8, 5, mask=mask)
        with torch.no_grad():
            if mask.any():
                layer.weight[mask.nonzero()[0].tolist()] = 0.0  # a zero kept inside the support
        other = SparseLinear(8, 5, mask=torch.rand(5, 8) < 0.5)
        other.load_state_dict(_roundtrip(layer.state_dict()))
        assert torch.equal(other.mask, layer.mask) and torch.equal(other.weight, layer.weight)


def test_conv1d_and_dtype_roundtrip():
    torch.manual_seed(0)
    layer = SparseConv1d(4, 6, 3, padding=1, mask=torch.rand(6, 4, 3) < 0.3).to(torch.float64)
    other = SparseConv1d(4, 6, 3, padding=1).to(torch.float64)
    sd = _roundtrip(layer.state_dict())
    assert sd["weight_values"].dtype == torch.float64
    other.load_state_dict(sd)
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.mask, layer.mask)


def test_old_dense_state_dict_still_loads():
    torch.manual_seed(0)
    layer = SparseConv2d(3, 4, 3, mask=torch.rand(4, 3, 3, 3) < 0.3)
    old = {"weight": layer.weight.detach().clone(), "mask": layer.mask.clone(), "bias": layer.bias.detach().clone()}
    other = SparseConv2d(3, 4, 3)
    other.load_state_dict(old)
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.mask, layer.mask)


def test_mismatched_state_dict_is_refused_naming_the_key():
    torch.manual_seed(0)
    layer = SparseLinear(8, 5, mask=torch.rand(5, 8) < 0.4)
    sd = layer.state_dict()
    bad = dict(sd, weight_values=sd["weight_values"][:-1])
    with pytest.raises(RuntimeError, match="weight_values"):
        SparseLinear(8, 5).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="does not fit"):
        SparseLinear(9, 5).load_state_dict(sd)  # a layer of another shape
    with pytest.raises(ValueError, match="fmt"):
        storage.encode_support(torch.ones(3, 3), "dense")


def test_finetuning_after_reload_keeps_the_support():
    torch.manual_seed(0)
    layer = SparseLinear(8, 5, mask=torch.rand(5, 8) < 0.4)
    other = SparseLinear(8, 5)
    other.load_state_dict(layer.state_dict())
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        other(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
    assert bool((other.weight[other.mask == 0] == 0).all())
    assert torch.equal(other.state_dict()["weight_bitmask"], layer.state_dict()["weight_bitmask"])


def test_keep_vars_state_dict_returns_the_live_parameters():
    """Exporters (TorchScript-based ONNX) match graph inputs to state_dict(keep_vars=True)."""
    layer = SparseLinear(8, 5, mask=torch.rand(5, 8) < 0.4)
    sd = layer.state_dict(keep_vars=True)
    assert sd["weight"] is layer.weight and torch.equal(sd["mask"], layer.mask)


@pytest.mark.slow
def test_torchvision_resnet18_at_density_01_stores_well_under_half():
    """The issue's case: 89 MB (dense weight + float mask) before; now values + index only."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()
    compact = ac.export(dense, _spec(0.1)).eval()
    rows = storage.storage_report(compact)
    assert len(rows) == 21  # 20 convs + fc
    sparse_bound = sum(4 * r["nnz"] + math.ceil(math.prod(r["shape"]) / 8) for r in rows)
    other = sum(_bytes(t) for k, t in compact.state_dict().items() if ".weight_" not in k)
    assert storage.storage_bytes(compact) <= sparse_bound + other
    assert storage.storage_bytes(compact) < 0.15 * storage.storage_bytes(dense)  # (0.1 + 1/32) + BN
    fresh = ac.export(dense, _spec(0.1)).eval()
    fresh.load_state_dict(_roundtrip(compact.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), compact(x))
