"""``FactoredMatrix``: a matrix ``M = A @ B`` kept as its two factors, with TransformerLens's operations.

An attention head's OV circuit ``W_V @ W_O`` is a (d_model, d_model) matrix of rank at most d_head; its QK circuit
``W_Q @ W_K^T`` too. Kept factored, products, singular values, eigenvalues and norms cost O(d_model * d_head^2)
instead of O(d_model^3). Leading dimensions (layer, head) broadcast like torch's batched matmul.

Conventions (TransformerLens's, so code written for ``transformer_lens.FactoredMatrix`` runs unchanged):
``svd()`` returns ``(U, S, V)`` with ``M == U @ diag(S) @ V^T`` (``V``'s columns are the right singular vectors;
``Vh`` is the same tensor, TL's historical name); ``eigenvalues`` are those of ``B @ A`` (the non-zero eigenvalues of
``A @ B``); ``norm()`` is the Frobenius norm; indexing applies to the leading dimensions first, then rows of ``A``
and columns of ``B``.

Example:
    >>> import torch
    >>> A, B = torch.randn(2, 3, 6, 2), torch.randn(2, 3, 2, 6)  # (layer, head, ldim, mdim), (layer, head, mdim, rdim)
    >>> fm = FactoredMatrix(A, B)
    >>> fm.shape, fm.mdim
    (torch.Size([2, 3, 6, 6]), 2)
    >>> torch.allclose(fm.AB, A @ B), torch.allclose(fm.norm(), (A @ B).flatten(-2).norm(dim=-1), atol=1e-4)
    (True, True)
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

__all__ = ["FactoredMatrix"]


class FactoredMatrix:
    """The matrix ``A @ B`` with ``A (..., ldim, mdim)`` and ``B (..., mdim, rdim)``, never multiplied out unless
    asked (``AB``). Leading dimensions of ``A`` and ``B`` broadcast against each other.

    Example:
        >>> import torch
        >>> fm = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 4))
        >>> (fm @ torch.randn(4, 3)).shape, (torch.randn(7, 5) @ fm).shape
        (torch.Size([5, 3]), torch.Size([7, 4]))
        >>> fm.T.shape, fm.S.shape
        (torch.Size([4, 5]), torch.Size([2]))
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
            raise TypeError(f"FactoredMatrix takes two tensors A (..., ldim, mdim) and B (..., mdim, rdim), got "
                            f"{type(A).__name__} and {type(B).__name__}.")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix factors must be at least 2D, got A {tuple(A.shape)} and B "
                             f"{tuple(B.shape)}; unsqueeze a vector into a (n, 1) or (1, n) matrix first.")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix: A's last dimension ({A.shape[-1]}) must equal B's second to last "
                             f"({B.shape[-2]}); shapes were A {tuple(A.shape)}, B {tuple(B.shape)}.")
        try:
            leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(f"FactoredMatrix: the leading dimensions of A {tuple(A.shape[:-2])} and B "
                             f"{tuple(B.shape[:-2])} do not broadcast.") from None
        self.A = A.broadcast_to(*leading, *A.shape[-2:])  # (..., ldim, mdim)
        self.B = B.broadcast_to(*leading, *B.shape[-2:])  # (..., mdim, rdim)
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.has_leading_dims = len(leading) > 0
        self.shape = torch.Size((*leading, self.ldim, self.rdim))

    # --- products ---------------------------------------------------------------------------------
    def __matmul__(self, other: Any) -> "FactoredMatrix | torch.Tensor":
        """``M @ other``: a vector ``(..., rdim)`` gives a vector ``(..., ldim)``; a matrix ``(..., rdim, k)`` or a
        FactoredMatrix gives a FactoredMatrix (factored through the smaller of its inner dimensions)."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim < 2:  # a vector
            self._check_dim(other.shape[-1], self.rdim, "columns", other)
            return (self.A @ (self.B @ other[..., None]))[..., 0]
        self._check_dim(other.shape[-2], self.rdim, "columns", other)
        if self.rdim > self.mdim:  # keep the inner dimension small: fold `other` into B
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Any) -> "FactoredMatrix | torch.Tensor":
        """``other @ M``: a vector ``(..., ldim)`` gives a vector ``(..., rdim)``; a matrix ``(..., k, ldim)`` gives a
        FactoredMatrix."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim < 2:
            self._check_dim(other.shape[-1], self.ldim, "rows", other)
            return ((other[..., None, :] @ self.A) @ self.B)[..., 0, :]
        self._check_dim(other.shape[-1], self.ldim, "rows", other)
        if self.ldim > self.mdim:  # fold `other` into A
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _check_dim(self, got: int, want: int, what: str, other: torch.Tensor) -> None:
        if got != want:
            raise ValueError(f"cannot multiply a FactoredMatrix of shape {tuple(self.shape)} ({want} {what}) with a "
                             f"tensor of shape {tuple(other.shape)}.")

    def __mul__(self, scalar: Any) -> "FactoredMatrix":
        """``M * c`` for a number (or a tensor broadcasting over the leading dimensions as ``c[..., None, None]``)."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() > 1:
            scalar = scalar[..., None, None]
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    @property
    def AB(self) -> torch.Tensor:
        """The product ``A @ B`` ``(..., ldim, rdim)`` (costly for large ldim / rdim)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product ``B @ A`` ``(..., mdim, mdim)``; needs ldim == rdim."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square FactoredMatrix (ldim == rdim), got shape {tuple(self.shape)}.")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        """The transpose ``B^T @ A^T``."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    # --- decompositions ------------------------------------------------------------------------------
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A = Ua Sa Va^T, B = Ub Sb Vb^T  =>  AB = Ua (Sa Va^T Ub Sb) Vb^T; the middle is (mdim, mdim)
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)  # Vha: Va^T
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        U = Ua @ Um  # (..., ldim, mdim)
        V = Vhb.transpose(-2, -1) @ Vhm.transpose(-2, -1)  # (..., rdim, mdim)
        return U, Sm, V

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, V)`` with ``M == U @ diag(S) @ V^T``: ``U (..., ldim, mdim)``, ``S (..., mdim)`` descending,
        ``V (..., rdim, mdim)`` (TL's convention: V, not its transpose)."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        return self._svd[1]

    @property
    def V(self) -> torch.Tensor:
        return self._svd[2]

    @property
    def Vh(self) -> torch.Tensor:
        """TL's name for ``V`` (it is V, not V^T: ``M == U @ diag(S) @ Vh^T``)."""
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of ``B @ A`` ``(..., mdim)`` (complex): the non-zero eigenvalues of ``A @ B``."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> torch.Tensor:
        """The Frobenius norm ``(...)``: the root of the sum of squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as ``(U sqrt(S)) @ (sqrt(S) V^T)``: both factors carry half the scale."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-2, -1))

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) @ V^T`` ``(..., mdim, rdim)``: the matrix with its left orthogonal factor (U) removed."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> torch.Tensor:
        """``U @ diag(S)`` ``(..., ldim, mdim)``: the matrix with its right orthogonal factor (V^T) removed."""
        return self.U * self.S[..., None, :]

    # --- shape --------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``."""
        return self.A, self.B

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """A new leading dimension at ``k`` (counted among all dimensions, like ``Tensor.unsqueeze``)."""
        if k < 0:
            k += self.ndim + 1
        if not 0 <= k <= self.ndim - 2:
            raise ValueError(f"unsqueeze({k}): a FactoredMatrix of shape {tuple(self.shape)} takes new dimensions "
                             f"among its leading ones only (0..{self.ndim - 2}).")
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def __getitem__(self, idx: Any) -> "FactoredMatrix":
        """Index the leading dimensions; an index one longer also picks rows (of A), two longer also columns (of
        B). ``fm[layer, head]`` is that head's matrix."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_leading = self.ndim - 2
        real = [i for i in idx if i is not None]
        if len(real) <= n_leading:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if len(real) > self.ndim:
            raise IndexError(f"too many indices ({len(real)}) for a FactoredMatrix of shape {tuple(self.shape)}.")
        as_slice = lambda i: slice(i, i + 1) if isinstance(i, int) else i  # noqa: E731 - keep the 2D factors 2D
        if None in idx:
            raise IndexError("FactoredMatrix: None (a new axis) is only accepted among the leading indices.")
        lead = idx[:n_leading]
        rows = as_slice(idx[n_leading])
        if len(real) == n_leading + 1:
            return FactoredMatrix(self.A[(*lead, rows)], self.B[lead])
        cols = as_slice(idx[n_leading + 1])
        return FactoredMatrix(self.A[(*lead, rows)], self.B[(*lead, slice(None), cols)])

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k`` of every dimension of ``A @ B``, computed from the corner rows / columns only."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(0, k) for _ in range(corner.ndim))]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({tuple(self.shape)}), Hidden Dim({self.mdim})"
