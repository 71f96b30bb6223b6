import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

# Two shared cores: pinned threads are faster and make every result bit-reproducible.
torch.set_num_threads(1)
