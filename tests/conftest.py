import os

import pytest
import torch

# One thread everywhere: on a shared 2-core machine oversubscribed threads make tiny models
# 100x slower, and one thread gives the same kernels (so the same numbers) in subprocesses
# (torchrun, a killed-and-resumed run) as in-process.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
