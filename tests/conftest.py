"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: faster for tiny tensors, and it leaves the other core to the rest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
