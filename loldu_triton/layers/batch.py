"""Many adapters in one batch: which row of a layer's adapter table each batch element uses, per thread.

The choice lives in a context variable, not in layer state: each thread (and asyncio task) sees only the batches
it entered itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn

# {layer: table row per batch element}
_BATCH_ROWS: contextvars.ContextVar[Dict[nn.Module, torch.Tensor]] = contextvars.ContextVar("loldu_batch_rows",
                                                                                            default={})
# How many adapter_batch contexts are open in any thread. While none is, forward skips the lookup, which
# torch.compile cannot trace.
_open_batches = [0]
COMPILED_BATCH = ("adapter_batch does not run under torch.compile(fullgraph=True) (its per-row choice is "
                  "thread-local state that a compiled graph cannot read): within adapter_batch call the model "
                  "that was not compiled, or one compiled without fullgraph=True (its LoLDU layers then run "
                  "eagerly)")
_open_batches_lock = threading.Lock()


@contextlib.contextmanager
def batch_rows_scope(rows: Dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Within the block, in this thread or task only, ``layer`` uses ``rows[layer]`` per batch element."""
    with _open_batches_lock:
        _open_batches[0] += 1
    token = _BATCH_ROWS.set({**_BATCH_ROWS.get(), **rows})
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)
        with _open_batches_lock:
            _open_batches[0] -= 1


def batch_rows(layer: nn.Module) -> Optional[torch.Tensor]:
    """The table rows ``layer`` uses per batch element in this thread's adapter_batch, or None outside one."""
    if not _open_batches[0]:
        return None
    if torch.compiler.is_compiling():  # (dynamo cannot read a context variable; say so before it does)
        raise RuntimeError(COMPILED_BATCH)
    return _BATCH_ROWS.get().get(layer)


def batches_open() -> int:
    """How many adapter_batch blocks are open, in any thread."""
    return _open_batches[0]
