"""Orthonormal Hadamard matrices of the orders linear layers have, for the rotation baseline.

A Hadamard matrix H (entries ±1, H·Hᵀ = n·I) scaled by 1/√n is orthogonal, so a linear layer keeps its
function when its input is rotated and its weight columns are rotated the same way:
x·Wᵀ = (x·H)·(W·H)ᵀ. The rotation spreads an outlier channel's energy over all channels, which is
why QuaRot quantizes rotated activations to 4 bits where plain per-token rounding fails.

Orders: Sylvester's construction gives every power of two (H_2k = [[H, H], [H, −H]]); Paley's first
construction gives q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 24, 44, 48, ...); Kronecker products of
those give their products (SmolLM2: 576 = 12·12·4, 1536 = 12·128). Any other order is a LowbitError.
Built once per order (cached), deterministic: nothing is stored with the model.
"""

from functools import cache

import torch

from ..errors import LowbitError


def _prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley I: order q + 1 from the quadratic residues mod q (q prime, q ≡ 3 mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sign_matrix(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n, or None if these constructions have none."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    for m in range(n, 3, -1):
        if n % m == 0 and m % 4 == 0 and _prime(m - 1) and (m - 1) % 4 == 3:
            rest = _sign_matrix(n // m)
            if rest is not None:
                return torch.kron(_paley(m - 1), rest)
    return None


@cache
def hadamard(n: int) -> torch.Tensor:
    """The orthonormal fp32 Hadamard matrix [n, n] (H·Hᵀ = I) used to rotate n channels."""
    h = _sign_matrix(n) if n >= 1 else None
    if h is None:
        raise LowbitError(f"no Hadamard matrix of order {n} is built here (orders: 2^k times products of "
                          "q + 1 for primes q ≡ 3 mod 4): the hadamard activation method cannot rotate this layer")
    return (h / n**0.5).float()
