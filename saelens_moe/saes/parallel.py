"""How one SAE is trained by several processes (`torch.distributed`).

Data parallel: every process holds the whole SAE and its own tokens; the few
statistics that mix tokens (the load-balancing share f_i, the finite-loss check,
routing counts) are summed over processes with `all_reduce`.

Expert parallel: process r also holds only experts [r * N/P, (r + 1) * N/P) (their
encoder columns, decoder rows, biases and omegas). Each (token, selected expert)
pair travels to the process owning the expert with `all_to_all`, the owner computes
the expert's pre-activations there and sends them back for the global Top-K; the
kept latents travel to their owners again, which decode them and send back the
partial reconstructions. PyTorch's functional `all_to_all_single` (the successor of
`torch.distributed.nn.functional`'s) carries the gradients of both trips backwards.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch.distributed import ProcessGroup

from saelens_moe.saes.moe import SparseCode

EXPERT_PARAMETERS = ("W_enc", "W_dec", "b_enc", "omega")
"""Parameters split by expert under expert parallelism; the rest are replicated."""


@dataclass(frozen=True)
class Parallel:
    """This process's place in a multi-process training run."""

    rank: int
    """Rank of this process in `group`."""
    world_size: int
    """Number of processes training the SAE."""
    expert_parallel: bool
    """Each process holds only its share of the experts."""
    group: ProcessGroup | None = None
    """The process group; None is the default group."""

    def experts_per_rank(self, n_experts: int) -> int:
        """Experts each process holds: N/P under expert parallelism, else N."""
        return n_experts // self.world_size if self.expert_parallel else n_experts

    def process_group(self) -> ProcessGroup:
        """The group as a ProcessGroup (the default group for None)."""
        group = self.group if self.group is not None else dist.group.WORLD
        assert group is not None, "torch.distributed is not initialised"
        return group

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process, in place (no gradient)."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s elementwise maximum over every process, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor


def expert_slice(parallel: Parallel, n_experts: int, block_size: int) -> slice:
    """The latents [d_sae] this process's experts own."""
    per_rank = parallel.experts_per_rank(n_experts) * block_size
    return slice(parallel.rank * per_rank, (parallel.rank + 1) * per_rank)


class ExpertExchange(NamedTuple):
    """Where each (token, selected expert) pair goes, and the way back.

    Pairs are the flattened [tokens, e] selections; they are sent grouped by the
    rank owning their expert.
    """

    order: torch.Tensor
    """Pairs sorted by owner rank. [tokens * e]"""
    unorder: torch.Tensor
    """The inverse permutation of `order`. [tokens * e]"""
    send_counts: list[int]
    """Pairs sent to each rank."""
    recv_counts: list[int]
    """Pairs received from each rank."""
    local_experts: torch.Tensor
    """Expert (within this rank's share) of each received pair. [received]"""
    parallel: Parallel

    @classmethod
    def plan(
        cls, experts: torch.Tensor, n_experts: int, parallel: Parallel
    ) -> "ExpertExchange":
        """Plan the exchange of `experts` [tokens, e]; reads the split sizes to the host."""
        per_rank = parallel.experts_per_rank(n_experts)
        flat = experts.reshape(-1)
        owners = flat // per_rank
        order = owners.argsort(stable=True)
        send = torch.zeros(parallel.world_size, dtype=torch.long, device=flat.device)
        send.index_add_(0, owners, torch.ones_like(owners))
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=parallel.group)
        send_counts, recv_counts = torch.stack([send, recv]).tolist()
        local = torch.empty(sum(recv_counts), dtype=flat.dtype, device=flat.device)
        dist.all_to_all_single(
            local, (flat % per_rank)[order], recv_counts, send_counts, parallel.group
        )
        return cls(order, order.argsort(), send_counts, recv_counts, local, parallel)

    def to_owners(self, per_pair: torch.Tensor) -> torch.Tensor:
        """Rows of `per_pair` [tokens * e, ...] at the ranks owning their experts."""
        rows = per_pair[self.order]
        if not rows.is_floating_point():  # indices: no gradient to carry
            out = rows.new_empty(sum(self.recv_counts), *rows.shape[1:])
            group = self.parallel.group
            dist.all_to_all_single(out, rows, self.recv_counts, self.send_counts, group)
            return out
        return functional_collectives.all_to_all_single(
            rows, self.recv_counts, self.send_counts, self.parallel.process_group()
        )

    def from_owners(self, received: torch.Tensor) -> torch.Tensor:
        """`to_owners` reversed: the owners' rows back in pair order. [tokens * e, ...]"""
        rows = functional_collectives.all_to_all_single(
            received, self.send_counts, self.recv_counts, self.parallel.process_group()
        )
        return rows[self.unorder]

    def pre_activations(
        self,
        sae_in: torch.Tensor,  # [tokens, d_in]
        n_active_experts: int,
        owner_pre: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Each pair's expert pre-activations, computed by the owner. [tokens, e, m]

        `owner_pre(inputs [received, d_in], local_experts [received, 1])` returns the
        owner's [received, 1, m].
        """
        inputs = self.to_owners(sae_in.repeat_interleave(n_active_experts, dim=0))
        pre = owner_pre(inputs, self.local_experts[:, None]).flatten(1)
        return self.from_owners(pre).view(sae_in.shape[0], n_active_experts, -1)

    def decode(
        self,
        code: SparseCode,  # [tokens, k], global latents
        experts: torch.Tensor,  # [tokens, e]
        block_size: int,
        owner_decode: Callable[[SparseCode], torch.Tensor],
    ) -> torch.Tensor:
        """sum_j f_j W_dec[j] over the kept latents, each decoded by its owner. [tokens, d_in]

        Each pair carries the kept latents of its own expert (the others as zeros);
        `owner_decode` decodes them against the owner's rows (local latent indices).
        """
        n_tokens, n_active = experts.shape
        k = code.values.shape[-1]
        is_own = (code.latents // block_size)[:, None, :] == experts[:, :, None]
        values = torch.where(is_own, code.values[:, None, :], 0.0).view(-1, k)
        within = (code.latents % block_size)[:, None, :].expand(-1, n_active, -1)
        received_within = self.to_owners(within.reshape(-1, k))
        local = self.local_experts[:, None] * block_size + received_within
        partial = owner_decode(SparseCode(self.to_owners(values), local))
        return self.from_owners(partial).view(n_tokens, n_active, -1).sum(dim=1)


def decode_at_owners(
    code: SparseCode,  # [tokens, k], global latents
    block_size: int,
    n_experts: int,
    parallel: Parallel,
    owner_decode: Callable[[SparseCode], torch.Tensor],
) -> torch.Tensor:
    """sum_j f_j W_dec[j] for any code, each latent decoded by its owner. [tokens, d_in]

    For codes that did not come from this batch's routing (`decode` of dense
    latents, as SAELens's evals call it): every (token, kept latent) pair travels
    to the owner of the latent's expert, and `owner_decode` decodes the received
    pairs, one latent each (local latent indices).
    """
    n_tokens, k = code.values.shape
    exchange = ExpertExchange.plan(code.latents // block_size, n_experts, parallel)
    values = exchange.to_owners(code.values.reshape(-1, 1))
    within = exchange.to_owners((code.latents % block_size).reshape(-1, 1))
    local = exchange.local_experts[:, None] * block_size + within
    partial = owner_decode(SparseCode(values, local))  # [received, d_in]
    return exchange.from_owners(partial).view(n_tokens, k, -1).sum(dim=1)
