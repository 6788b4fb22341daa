"""How the Triton custom ops of this package launch their kernels.

Every kernel of ``moe_dist`` runs inside a ``torch.library.triton_op``, so ``torch.compile``
sees one opaque-to-Dynamo custom op per call (no graph break) and Inductor sees the kernel
launch itself. Inside an op, kernels are launched through :func:`launcher`, which picks:

* a compiled (``@triton.jit``) kernel: ``torch.library.wrap_triton(kernel)``. Under fake or
  functional tracing this records the launch (or does nothing for fake tensors); in eager mode
  ``triton_op`` turns wrapping off and the kernel runs directly.
* an interpreted kernel (``TRITON_INTERPRET=1``, CPU tests): the kernel itself on real tensors.
  Given fake tensors (Dynamo's shape propagation, ``opcheck``'s fake test) there is nothing to
  compute, so :func:`launcher` returns ``None`` and the op only allocates its outputs. An
  interpreted kernel cannot be recorded into an AOTAutograd graph (``wrap_triton`` needs the
  compiled kernel's metadata), so functional tracing raises instead of dropping the launch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` is a ``@triton.jit`` function built under ``TRITON_INTERPRET=1``."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def launcher(kernel: Any, probe: torch.Tensor) -> Callable | None:
    """The object to index with the grid and call, or ``None`` when nothing must run.

    ``probe`` is any tensor argument of the launch; it tells real tensors from traced ones.
    """
    if not is_interpreted(kernel):
        return torch.library.wrap_triton(kernel)
    if isinstance(probe, FunctionalTensor):
        raise RuntimeError(
            "moe_dist's Triton ops run under TRITON_INTERPRET=1 here, and an interpreted kernel "
            "cannot be recorded by AOTAutograd; compile with backend='eager' (Dynamo only) or run "
            "on CUDA without TRITON_INTERPRET")
    return None if is_fake(probe) else kernel
