import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: extra threads only add contention on a shared CPU (60x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
