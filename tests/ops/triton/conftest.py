"""Fixtures shared by the Triton launcher tests."""
import pytest


class CountLaunches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def count_launches(monkeypatch):
    """count_launches(module, "kernel_name") puts a launch counter in place of the module's kernel
    (for this test) and returns it."""
    def patch(module, name: str) -> CountLaunches:
        counter = CountLaunches(getattr(module, name))
        monkeypatch.setattr(module, name, counter)
        return counter
    return patch
