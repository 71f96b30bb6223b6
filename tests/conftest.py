import os
import zlib

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

# Two shared cores: pinned threads are faster and make every result bit-reproducible.
torch.set_num_threads(1)

# Without a GPU the Triton kernels run in the interpreter (set before any kernel module is imported,
# since triton.jit reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from its own fixed seed (from its id): torch seeds its default generator at random per
    process, so a test that draws unseeded data was a different test on every run (one failed ~3 % of runs).
    Now a test's data are the same in every run and whatever ran before it."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
