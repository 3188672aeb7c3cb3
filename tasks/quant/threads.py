"""Computations whose result must not depend on how many threads torch runs with.

A content-addressed store promises that one key names one set of bytes, and the thread count
is not in the key: `doit -n 2` gives each step half the cores, OMP_NUM_THREADS is the user's.
Most of torch's CPU kernels split their work over outputs, so each output element is computed
by one thread in one order whatever the thread count (measured with torch 2.13 and MKL 2024.2:
the linears, attention and norms of a decoder layer, reductions along one dimension). Three
kinds are not, and give bits that change with the thread count:

- LAPACK's Cholesky factorisation and inverse (MKL's potrf/potri split the blocked update);
- a reduction of a whole tensor to one number (torch.sum/mean without dim splits the tensor
  between threads and adds the partial sums);
- a matrix product whose inner dimension is long against its outputs (X^T X over many tokens:
  MKL splits the inner dimension and adds the partial products; measured on [8192, 576] and
  [2048, 64]).

`fixed_threads` runs the first two on one thread, in one order: they take milliseconds here.
X^T X is the calibrated quantizers' largest product, so `token_gram` keeps the caller's
threads and fixes the order instead: it sums the products of 512-token chunks one after the
other, and a product over 512 tokens is split over its outputs only (measured: the same bits
on 1 to 4 threads for widths 32 to 1536). See docs/design.md for the measurements.
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


TOKEN_CHUNK = 512  # tokens per product in token_gram: short enough that MKL never splits them


def token_gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X [in, in] of inputs x [..., in] in float32: the products of TOKEN_CHUNK tokens at a
    time, added in order, so the sum over the tokens runs the same way on any thread count (one
    product over all the tokens is split between threads along the tokens)."""
    x = x.reshape(-1, x.shape[-1]).float()
    gram = None
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        chunk = x[start : start + TOKEN_CHUNK]
        product = chunk.T @ chunk
        gram = product if gram is None else gram.add_(product)
    return gram if gram is not None else x.new_zeros(x.shape[-1], x.shape[-1])


def total(t: torch.Tensor) -> torch.Tensor:
    """The sum of every element of t, on one thread: torch sums a large tensor in one chunk per
    thread otherwise, and adds the chunks' sums (about 0.3 ms per million elements)."""
    with fixed_threads(1):
        return t.sum()
