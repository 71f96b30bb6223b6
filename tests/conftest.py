import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

# Two shared cores: pinned threads are faster and make every result bit-reproducible.
torch.set_num_threads(1)

# Without a GPU the Triton kernels run in the interpreter (set before any kernel module is imported,
# since triton.jit reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
