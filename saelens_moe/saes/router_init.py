"""A router that starts from the data: one spherical k-means centroid per expert.

A random router splits tokens by directions unrelated to the data, and load
balancing then holds that split in place. Started from k-means centroids of the
first training batch instead, each expert begins with one region of the data. On the
domain ground truth that made routing follow the domains 2-3x as much and raised
explained variance on clustered and independent data at 1M tokens; by 4M tokens that
gain had turned into a loss of 0.002-0.004 (`benchmarks/README.md`).
"""

from collections.abc import Callable
from typing import Any, Literal, cast, get_args

import torch

from saelens_moe.saes.parallel import Parallel

RouterInit = Literal["kmeans", "random"]
ROUTER_INITS: tuple[str, ...] = get_args(RouterInit)
KMEANS_ITERATIONS = 25
PROBE_SEED = 0
"""Seed of the probe directions that pick the starting centroids."""
KMEANS_LOGIT_SCALE = 4.0
"""Router logit of a token of mean norm lying exactly on its expert's centroid."""


@torch.no_grad()
def _kmeans_router(
    router_in: torch.Tensor,  # [tokens, d_in]
    n_experts: int,
    parallel: Parallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W_router [d_in, n_experts] and b_router [n_experts] routing each token to its
    nearest centroids by cosine, from k-means over every process's tokens.

    Logits are `KMEANS_LOGIT_SCALE` * cosine * norm / mean norm, so the router's
    softmax starts neither flat nor saturated. Every process computes the same
    centroids: the starting ones and each iteration's sums are summed over processes.
    """
    router_in = router_in.to(torch.promote_types(router_in.dtype, torch.float32))
    directions = torch.nn.functional.normalize(router_in, dim=-1)
    centroids = _starting_centroids(directions, n_experts, parallel)
    for _ in range(KMEANS_ITERATIONS):
        nearest = (directions @ centroids.T).argmax(dim=-1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, directions)
        sums = _summed(sums, parallel)
        empty = (sums.norm(dim=-1, keepdim=True) == 0).expand_as(sums)
        # an empty cluster keeps its centroid
        centroids = torch.nn.functional.normalize(
            torch.where(empty, centroids, sums), dim=-1
        )
    n_tokens = router_in.new_tensor(float(router_in.shape[0]))
    norms = _summed(torch.stack([router_in.norm(dim=-1).sum(), n_tokens]), parallel)
    scale = KMEANS_LOGIT_SCALE * norms[1] / norms[0]
    W_router = centroids.T * scale
    return W_router, torch.zeros_like(W_router[0])


# once per run: torch.compile runs it eagerly rather than trace 25 iterations
# (torch.compiler.disable's typing loses the signature)
kmeans_router: Callable[
    [torch.Tensor, int, Parallel | None], tuple[torch.Tensor, torch.Tensor]
] = cast(Any, torch.compiler.disable(_kmeans_router))


def _starting_centroids(
    directions: torch.Tensor, n_experts: int, parallel: Parallel | None
) -> torch.Tensor:
    """For each expert, the token furthest along a fixed random probe direction.

    The choice depends on the set of tokens, not on their order or on how they are
    split over processes, so data-parallel processes start where one process
    holding the whole batch would.
    """
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probes = torch.randn(n_experts, directions.shape[1], generator=generator)
    scores = directions @ probes.to(directions).T  # [tokens, n_experts]
    best, token = scores.max(dim=0)
    mine = torch.ones_like(best, dtype=torch.bool)
    if parallel is not None:
        mine = best == parallel.max(best.clone())
    starts = torch.where(mine[:, None], directions[token], 0.0)
    return torch.nn.functional.normalize(_summed(starts, parallel), dim=-1)


def _summed(tensor: torch.Tensor, parallel: Parallel | None) -> torch.Tensor:
    return tensor if parallel is None else parallel.sum(tensor)
