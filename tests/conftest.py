"""Two lanes: the CPU lane (CI) runs Triton kernels under the interpreter on tiny shapes; the
``gpu`` lane (``pytest -m gpu`` on a CUDA machine) runs them compiled.

TRITON_INTERPRET must be set before anything imports triton (diffusers does, on import).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (gpu lane: run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / torch.empty_like return NaN-filled float tensors, so an output element a
    kernel never writes shows up as NaN instead of stale memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
