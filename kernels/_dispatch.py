"""The one dispatch rule every kernel follows, read at call time (so a test can switch paths in one process).

Triton when the tensors are on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1, which must be set
before triton is first imported: tests/conftest.py does it); the torch path otherwise. Without a GPU and without
the interpreter a kernel launch fails with "0 active drivers", so CPU-only users must never reach one.
"""

import os

import torch


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
