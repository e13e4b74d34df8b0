import os

import torch

# Kernel tests run the Triton kernels on CPU tensors through the interpreter; it must be switched on before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
