import pytest
import torch

from numerics import poisoned  # noqa: F401  (fixture)


@pytest.fixture
def device() -> torch.device:
    """Kernels run compiled on a GPU when there is one, else through the Triton interpreter on CPU tensors."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
