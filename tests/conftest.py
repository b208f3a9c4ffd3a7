"""Shared test fixtures: deterministic seeding.  Keep this file minimal."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen():
    """A seeded ``torch.Generator`` (CPU) for tests that draw their own data."""
    return torch.Generator().manual_seed(1234)
