"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates (Frantar & Alistarh 2023, Alg. 1).

For a linear layer with weight W ([out, in]) and calibration inputs X ([tokens, in]) the layer-wise problem is
min ||W X^T - What X^T||^2 subject to the sparsity pattern. Its Hessian is H = (2/N) X^T X (N sequences). With
U the upper Cholesky factor of (H + lambda I)^-1, lambda = damp * mean(diag H), columns are processed left to
right in blocks of ``blocksize``:

* the mask of a block is chosen when the sweep reaches it, from the OBS saliency w_ij^2 / U_jj^2 of the
  *current* (already updated) weights: unstructured, the lowest ``round(s * rows * blocksize)`` of the block
  (rows and columns together, as the reference code does); N:M, the M - N lowest of each row's group of M
  columns, chosen when the sweep reaches the group's first column;
* column j: q = w with pruned entries zeroed, err = (w - q) / U_jj, and the remaining columns of the block get
  W[:, k] -= err * U[j, k] (the OBS compensation); after the block, later columns get the accumulated
  update in one matmul (the "lazy batch" trick).

Unlike Wanda, the kept weights change. Inputs that never fire (H_jj = 0) get H_jj = 1 and their column zeroed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from zolm.blocks import out_in
from zolm.errors import ZolmError
from zolm.prune.masks import layer_mask, n_pruned, nm_mask

log = logging.getLogger(__name__)


class SparseGPT:
    """Accumulate X^T X from a layer's inputs (``add_batch``), then ``prune`` its weight in place; ``free``."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.rows, self.cols = out_in(layer).shape
        self.H: torch.Tensor | None = torch.zeros(self.cols, self.cols, dtype=torch.float32,
                                                  device=layer.weight.device)
        self.nseq = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add a batch of layer inputs ([..., in]) to the running X^T X (float32)."""
        assert self.H is not None, "SparseGPT.add_batch after free()"
        flat = x.detach().reshape(-1, self.cols).float()
        self.H.addmm_(flat.t(), flat)
        self.nseq += x.shape[0] if x.dim() >= 3 else 1

    def _inverse_factor(self, H: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor of (H + lambda I)^-1; lambda grows tenfold (up to 3 times) if H is singular."""
        lam = damp * float(torch.diag(H).mean())
        eye = torch.eye(self.cols, dtype=H.dtype, device=H.device)
        for attempt in range(4):
            L, info = torch.linalg.cholesky_ex(H + lam * eye)
            if int(info) == 0:
                return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            log.warning("SparseGPT: Hessian not positive definite (damp %.3g), retrying with 10x damping",
                        lam)
            lam = max(lam * 10, 1e-8) if attempt < 3 else lam
        raise ZolmError(f"SparseGPT: the {self.cols}x{self.cols} input Hessian stays singular after damping; "
                        "use more calibration data")

    @torch.no_grad()
    def prune(self, sparsity: float, nm: tuple[int, int] | None = None, blocksize: int = 128,
              damp: float = 0.01) -> float:
        """Prune the layer's weight in place; returns the OBS error estimate sum (w - q)^2 / (2 U_jj^2).

        Args:
            sparsity: unstructured ratio (ignored when ``nm`` is given).
            nm: ``(n, m)``: keep n of every m consecutive input weights; ``blocksize`` must be a multiple of m.
            blocksize: columns per lazy-update block (128 in the paper).
            damp: lambda = damp * mean(diag H) (0.01 in the paper).
        """
        if self.H is None or self.nseq == 0:
            raise ZolmError("SparseGPT.prune needs calibration inputs (add_batch) first")
        if nm is not None and (blocksize % nm[1] or self.cols % nm[1]):
            raise ZolmError(f"SparseGPT N:M needs the block size ({blocksize}) and the input dimension "
                            f"({self.cols}) to be multiples of M={nm[1]}")
        target = out_in(self.layer)
        W = target.float().clone()  # [rows, cols]
        H = self.H * (2.0 / self.nseq)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        U = self._inverse_factor(H, damp)
        loss = 0.0
        for i1 in range(0, self.cols, blocksize):
            i2 = min(i1 + blocksize, self.cols)
            W1 = W[:, i1:i2].clone()  # [rows, count]
            U1 = U[i1:i2, i1:i2]
            d = torch.diag(U1)  # [count]
            err1 = torch.zeros_like(W1)
            if nm is None:  # the block's mask at once, from the saliency of the current weights
                drop1 = ~layer_mask(W1.pow(2) / d.pow(2).unsqueeze(0), sparsity)
            else:  # N:M: each group's mask when the sweep reaches it
                drop1 = torch.zeros_like(W1, dtype=torch.bool)
            for j in range(i2 - i1):
                if nm is not None and j % nm[1] == 0:
                    sal = W1[:, j:j + nm[1]].pow(2) / d[j:j + nm[1]].pow(2).unsqueeze(0)
                    drop1[:, j:j + nm[1]] = ~nm_mask(sal, *nm)
                w = W1[:, j]
                q = w.masked_fill(drop1[:, j], 0.0)
                e = (w - q) / d[j]
                W1[:, j:].addr_(e, U1[j, j:], alpha=-1.0)  # OBS update of this block's columns
                W1[:, j] = q  # exact zeros (the update above leaves q up to rounding)
                err1[:, j] = e
            loss += float(err1.pow(2).sum()) / 2
            W[:, i1:i2] = W1
            W[:, i2:] -= err1 @ U[i1:i2, i2:]  # lazy update of all later columns
        target.copy_(W.to(target.dtype))
        return loss

    def free(self) -> None:
        """Drop the Hessian (cols x cols floats)."""
        self.H = None


def expected_zeros(rows: int, cols: int, sparsity: float, blocksize: int = 128) -> int:
    """How many weights SparseGPT's unstructured mode zeroes in a [rows, cols] layer (per-block rounding)."""
    return sum(n_pruned(rows * (min(i + blocksize, cols) - i), sparsity) for i in range(0, cols, blocksize))
