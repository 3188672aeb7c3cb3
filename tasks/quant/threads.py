"""Computations whose result must not depend on how many threads torch runs with.

A content-addressed store promises that one key names one set of bytes, and the thread count
is not in the key: `doit -n 2` gives each step half the cores, OMP_NUM_THREADS is the user's.
Most of torch's CPU kernels split their work over outputs, so each output element is computed
by one thread in one order whatever the thread count (measured with torch 2.13 and MKL 2024.2:
the linears, attention and norms of a decoder layer, X^T X over one batch of calibration
tokens, reductions along one dimension). Three kinds are not, and give bits that change with
the thread count:

- LAPACK's Cholesky factorisation and inverse (MKL's potrf/potri split the blocked update);
- a reduction of a whole tensor to one number (torch.sum/mean without dim splits the tensor
  between threads and adds the partial sums);
- a matrix product whose inner dimension is long against its outputs (X^T X over many tokens:
  MKL splits the inner dimension and adds the partial products).

`fixed_threads` runs such a computation on one thread, in one order. On the shapes used here
(width 576 to 1536) those calls take milliseconds, so one thread costs little; see
docs/design.md for the measurements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["fixed_threads", "token_gram", "total"]


@contextlib.contextmanager
def fixed_threads(threads: int = 1) -> Iterator[None]:
    """Run the block with torch (and the BLAS/LAPACK under it) on exactly `threads` threads,
    then restore the caller's count. CPU only: a CUDA kernel's order does not depend on it."""
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def token_gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X [in, in] of inputs x [..., in] in float32, on one thread: the product sums over
    the tokens, and with few outputs against many tokens MKL splits the tokens between threads
    (measured: [2048, 64] with 2 threads or more)."""
    x = x.reshape(-1, x.shape[-1]).float()
    with fixed_threads(1):
        return x.T @ x


def total(t: torch.Tensor) -> torch.Tensor:
    """The sum of every element of t, on one thread: torch sums a large tensor in one chunk per
    thread otherwise, and adds the chunks' sums (about 0.3 ms per million elements)."""
    with fixed_threads(1):
        return t.sum()
