"""torch's intra-op thread count, set for a block and given back.

It is process-wide: a library call (`bench`, `cpp_check`) that needs its own count must leave
its caller's as it was, even when it fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads, then restore the caller's count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
