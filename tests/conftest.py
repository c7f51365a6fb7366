import os

import torch

# Triton kernels run in the interpreter when there is no GPU. This must happen before any Triton
# kernel module is imported (the @triton.jit decorator reads it), i.e. here, at the very top.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
