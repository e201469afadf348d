"""Fixtures shared by the model's tests."""

from __future__ import annotations

import pytest

from harness.model import cpu_kernels


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch) -> str:
    """Run the test on the fused CPU kernels, and again on the torch code (as when the extension cannot build)."""
    assert cpu_kernels.available(), "the CPU kernels did not build (see the warning)"
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "_built", False)
    return request.param
