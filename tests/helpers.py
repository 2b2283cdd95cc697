"""Test helpers shared across modules."""

import torch
from torch import nn


class Quadratic(nn.Module):
    """f(theta) = 0.5 theta^T A theta with a fixed SPD matrix A."""

    def __init__(self, d: int = 100, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(d, d, generator=g, dtype=dtype) / d**0.5
        self.register_buffer("A", m @ m.T + 0.5 * torch.eye(d, dtype=dtype))
        self.theta = nn.Parameter(torch.randn(d, generator=g, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta

    @torch.no_grad()
    def value(self) -> float:
        return float(self())

    def grad(self) -> torch.Tensor:
        return self.A @ self.theta.detach()


def gradients_and_loss(model, batch, kind: str = "classification"):
    """(true gradients by backprop of the task loss on ``batch``, a no-grad loss closure): the estimator target."""
    from zolm.eval.scoring import task_loss

    for p in model.parameters():
        p.requires_grad_(True)
    task_loss(model, batch, kind).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, batch, kind))

    return grads, loss
