"""Metrics for the claims of the Scale SAE paper (arXiv 2511.05745), for any SAELens SAE.

Decoder geometry (redundancy, feature dimensionality) needs only `W_dec` and works
on every SAELens SAE; a dense SAE counts as a single expert. Expert metrics (load,
entropy, omega) need a router and come back as None for dense SAEs.

Definitions:
- Redundancy(tau): fraction of latents j with max_{j' != j} cos(W_dec[j], W_dec[j'])
  > tau, and the mean of that max; split into intra-expert (j' in j's expert) and
  inter-expert (j' in another expert).
- Expert load: share of tokens for which each expert is selected, and for which it
  is the first choice; normalised entropy of each distribution; experts never
  selected.
- Feature dimensionality (Chaudhari et al., arXiv 2510.23671):
  D_j = ||W_dec[j]||^2 / sum_{j' in expert(j)} (unit(W_dec[j]) . W_dec[j'])^2,
  averaged per expert; the global value is the usage-weighted mean over experts.
- Network sparsity e / N; encoder multiply-adds per token d_in * N + e * m * d_in
  (MoE) or d_in * d_sae (dense).
- Routing specialisation, given each token's known domains (a synthetic ground
  truth): NMI between selected experts and domains, each expert's domain purity and
  effective number of domains served, each beside its chance level (domains
  shuffled across tokens: same expert load, no link).
"""

import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import SAE
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import cosine_similarities

from saelens_moe.router_health import ExpertLoad, ExpertLoadCounter
from saelens_moe.saes.moe import Routing, route

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.7, 0.8, 0.9)
DEFAULT_BLOCK_BYTES = 256 * 2**20
"""Largest similarity block held at once; d_sae 24576 then peaks near 0.5 GB."""

ActivationSource = torch.Tensor | ActivationsStore | Iterable[torch.Tensor]
Evaluator = Callable[[Any, Any, Any], dict[str, Any]]


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ExpertLayout:
    """How an SAE's latents are split into experts (a dense SAE is one expert)."""

    d_sae: int
    """Total number of latents."""
    n_experts: int
    """Number of experts N; expert i owns latents [i * m, (i + 1) * m)."""
    n_active_experts: int
    """Experts selected per token, e."""
    has_router: bool
    """Whether the SAE routes tokens (Scale / Switch) or is dense."""

    @property
    def latents_per_expert(self) -> int:
        """m = d_sae / N."""
        return self.d_sae // self.n_experts


def expert_layout(sae: SAE[Any]) -> ExpertLayout:
    """Read the expert layout from any SAELens SAE's config."""
    cfg = sae.cfg
    has_router = isinstance(getattr(sae, "W_router", None), torch.Tensor)
    n_experts = int(getattr(cfg, "n_experts", 1)) if has_router else 1
    n_active = int(getattr(cfg, "n_active_experts", 1)) if has_router else 1
    return ExpertLayout(cfg.d_sae, n_experts, n_active, has_router)


def encoder_flops_per_token(layout: ExpertLayout, d_in: int) -> int:
    """Encoder multiply-adds per token: d_in*N + e*m*d_in (MoE) or d_in*d_sae (dense)."""
    if not layout.has_router:
        return d_in * layout.d_sae
    routed = layout.n_active_experts * layout.latents_per_expert * d_in
    return d_in * layout.n_experts + routed


def network_sparsity(layout: ExpertLayout) -> float:
    """e / N: the fraction of the dictionary a token can reach."""
    return layout.n_active_experts / layout.n_experts


# --------------------------------------------------------------------- decoder geometry


class MaxCosines(NamedTuple):
    """Per latent, the largest cosine with any other latent's decoder row."""

    overall: torch.Tensor
    """Over all other latents. [d_sae]"""
    intra_expert: torch.Tensor | None
    """Over other latents of the same expert; None with one expert or m == 1. [d_sae]"""
    inter_expert: torch.Tensor | None
    """Over latents of other experts; None with one expert. [d_sae]"""


def _unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    rows = W_dec.detach()
    if rows.dtype != torch.float64:
        rows = rows.float()
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def row_blocks(n_rows: int, row_bytes: int, max_block_bytes: int) -> Iterator[slice]:
    """Consecutive row slices, each of whose [rows, columns] block fits the budget."""
    rows_per_block = max(1, max_block_bytes // max(row_bytes, 1))
    for start in range(0, n_rows, rows_per_block):
        yield slice(start, min(start + rows_per_block, n_rows))


@torch.no_grad()
def max_cosines(
    W_dec: torch.Tensor,  # [d_sae, d_in]
    n_experts: int = 1,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    live: torch.Tensor | None = None,  # [d_sae] bool
) -> MaxCosines:
    """Max cosine of each decoder row with the others, one row block at a time.

    With `live`, only live latents count as others; a row with no live latent in a
    scope gets -inf there.
    """
    unit = _unit_rows(W_dec)
    dead = None if live is None else ~live.to(unit.device)
    d_sae = unit.shape[0]
    block_size = d_sae // n_experts
    overall = unit.new_empty(d_sae)
    split = n_experts > 1
    intra = unit.new_empty(d_sae) if split and block_size > 1 else None
    inter = unit.new_empty(d_sae) if split else None
    # sims plus one copy of a row's own expert block
    row_bytes = unit.element_size() * (d_sae + block_size)
    for rows in row_blocks(d_sae, row_bytes, max_block_bytes):
        sims = unit[rows] @ unit.T  # [b, d_sae]
        local = torch.arange(sims.shape[0], device=sims.device)
        latents = local + rows.start
        sims[local, latents] = float("-inf")
        if dead is not None:
            sims[:, dead] = float("-inf")
        overall[rows] = sims.max(dim=-1).values
        if inter is None:
            continue
        by_expert = sims.view(-1, n_experts, block_size)  # [b, N, m]
        own_expert = latents // block_size
        if intra is not None:
            intra[rows] = by_expert[local, own_expert].max(dim=-1).values
        by_expert[local, own_expert] = float("-inf")
        inter[rows] = sims.max(dim=-1).values
    return MaxCosines(overall, intra, inter)


@dataclass(frozen=True)
class RedundancyScope:
    """Redundancy of the decoder rows measured against one set of other latents."""

    fraction_above: dict[float, float]
    """Threshold tau -> fraction of latents whose max cosine exceeds tau."""
    mean_max_cosine: float
    """Mean over latents of the max cosine."""

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat {"<prefix><tau>": fraction, "<prefix>mean_max_cosine": mean}."""
        values = {f"{prefix}{tau:g}": v for tau, v in self.fraction_above.items()}
        return {**values, f"{prefix}mean_max_cosine": self.mean_max_cosine}


def redundancy_scope(
    max_cos: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> RedundancyScope:
    """Summarise per-latent max cosines at each threshold.

    Latents without a partner in scope (-inf) count as below every threshold and
    are left out of the mean (NaN when no latent has one).
    """
    finite = max_cos.isfinite()
    # no boolean indexing: its size depends on the data (meta tensors refuse it)
    finite_sum = torch.where(finite, max_cos.float(), 0.0).sum()
    return RedundancyScope(
        {tau: (max_cos > tau).float().mean().item() for tau in thresholds},
        (finite_sum / finite.sum()).item(),  # 0 / 0: NaN
    )


@dataclass(frozen=True)
class Redundancy:
    """Decoder redundancy overall, within experts and across experts."""

    overall: RedundancyScope
    """Against every other latent."""
    intra_expert: RedundancyScope | None
    """Against other latents of the same expert (None for one expert)."""
    inter_expert: RedundancyScope | None
    """Against latents of other experts (None for one expert)."""

    def to_dict(self) -> dict[str, float]:
        """Flat keys "redundancy/<tau>", "redundancy/intra_expert/<tau>", ..."""
        out = self.overall.to_dict("redundancy/")
        if self.intra_expert is not None:
            out |= self.intra_expert.to_dict("redundancy/intra_expert/")
        if self.inter_expert is not None:
            out |= self.inter_expert.to_dict("redundancy/inter_expert/")
        return out


def redundancy_from_max_cosines(
    max_cos: MaxCosines, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> Redundancy:
    """Redundancy at each threshold from precomputed max cosines."""
    intra, inter = max_cos.intra_expert, max_cos.inter_expert
    return Redundancy(
        redundancy_scope(max_cos.overall, thresholds),
        None if intra is None else redundancy_scope(intra, thresholds),
        None if inter is None else redundancy_scope(inter, thresholds),
    )


def highpass_decoder(W_dec: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each decoder row minus its expert's mean row: the high-pass decoder. [d_sae, d_in]

    The Scale SAE authors' evaluation can measure redundancy on it (a decomposed
    decoder); `decoder_redundancy(highpass_decoder(W_dec, N), N)` does.
    """
    blocks = W_dec.detach().view(n_experts, -1, W_dec.shape[-1])  # [N, m, d_in]
    return (blocks - blocks.mean(dim=1, keepdim=True)).reshape(W_dec.shape)


def decoder_redundancy(
    W_dec: torch.Tensor,  # [d_sae, d_in]
    n_experts: int = 1,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    live: torch.Tensor | None = None,  # [d_sae] bool
) -> Redundancy:
    """Redundancy(tau) of decoder rows, split intra / inter expert.

    With `live`, over live latents only, each against the other live latents (a dead
    latent left behind next to its live copy is then no duplicate).
    """
    cosines = max_cosines(W_dec, n_experts, max_block_bytes, live)
    if live is not None:
        rows = live.to(cosines.overall.device)
        intra, inter = cosines.intra_expert, cosines.inter_expert
        cosines = MaxCosines(
            cosines.overall[rows],
            None if intra is None else intra[rows],
            None if inter is None else inter[rows],
        )
    return redundancy_from_max_cosines(cosines, thresholds)


@dataclass(frozen=True)
class FeatureDimensionality:
    """Feature dimensionality per expert and overall (arXiv 2510.23671)."""

    per_expert: list[float]
    """Mean D_j over each expert's latents. [n_experts]"""
    global_value: float
    """Usage-weighted mean of per_expert (uniform weights without usage)."""
    network_sparsity: float
    """e / N."""

    def to_dict(self) -> dict[str, Any]:
        """Keys "feature_dimensionality/{global,per_expert}" and "network_sparsity"."""
        return {
            "feature_dimensionality/global": self.global_value,
            "feature_dimensionality/per_expert": list(self.per_expert),
            "network_sparsity": self.network_sparsity,
        }


@torch.no_grad()
def latent_dimensionality(
    W_dec: torch.Tensor,  # [d_sae, d_in]
    n_experts: int = 1,
    unit_rows: bool = True,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """D_j for every latent against its own expert's rows. [d_sae]

    With `unit_rows` (default) rows are normalised first, as SAEs decode along unit
    directions; D_j is then 1 / sum_{j'} cos(j, j')^2 and lies in (0, 1].
    """
    decoder = _unit_rows(W_dec) if unit_rows else W_dec.detach().float()
    unit = _unit_rows(decoder)
    block_size = decoder.shape[0] // n_experts
    out = decoder.new_empty(decoder.shape[0])
    row_bytes = decoder.element_size() * block_size
    for expert in range(n_experts):
        first = expert * block_size
        members = decoder[first : first + block_size]  # [m, d_in]
        for local in row_blocks(block_size, row_bytes, max_block_bytes):
            rows = slice(first + local.start, first + local.stop)
            projections = unit[rows] @ members.T  # [b, m]
            denominators = projections.pow(2).sum(-1).clamp(min=1e-12)
            out[rows] = decoder[rows].pow(2).sum(-1) / denominators
    return out


def feature_dimensionality(
    W_dec: torch.Tensor,  # [d_sae, d_in]
    layout: ExpertLayout,
    usage: Sequence[float] | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> FeatureDimensionality:
    """Per-expert mean D_j and its usage-weighted mean (`usage`: one weight per expert)."""
    per_latent = latent_dimensionality(
        W_dec, layout.n_experts, max_block_bytes=max_block_bytes
    )
    per_expert = per_latent.view(layout.n_experts, -1).mean(dim=-1)
    weights = (
        torch.ones_like(per_expert)
        if usage is None
        else torch.tensor(list(usage), dtype=per_expert.dtype, device=per_expert.device)
    )
    if weights.sum() <= 0:
        weights = torch.ones_like(per_expert)
    global_value = (per_expert * weights).sum() / weights.sum()
    return FeatureDimensionality(
        per_expert.tolist(), global_value.item(), network_sparsity(layout)
    )


# ------------------------------------------------------------------------ expert load


def expert_load_from_routing(routing: Routing) -> ExpertLoad:
    """Expert load of one routed batch."""
    counter = ExpertLoadCounter(routing.probs.shape[-1])
    counter.add(routing.experts)
    return counter.result()


def activation_batches(
    source: ActivationSource, n_batches: int = 10, batch_size: int = 4096
) -> Iterator[torch.Tensor]:
    """Batches of activations from a tensor (split), an ActivationsStore or an iterable."""
    if isinstance(source, torch.Tensor):
        yield from source.split(batch_size)
    elif isinstance(source, ActivationsStore):
        for _ in range(n_batches):
            yield source.next_batch()
    else:
        for index, batch in enumerate(source):
            if index >= n_batches:
                return
            yield batch


@torch.no_grad()
def route_activations(sae: SAE[Any], activations: torch.Tensor) -> Routing:
    """The routing a Scale / Switch SAE applies to raw activations [..., d_in]."""
    cfg: Any = sae.cfg
    sae_in = sae.process_sae_in(activations.to(sae.device)).reshape(-1, cfg.d_in)
    W_router: torch.Tensor = getattr(sae, "W_router")  # noqa: B009
    b_router: torch.Tensor = getattr(sae, "b_router")  # noqa: B009
    return route(sae_in, W_router, b_router, cfg.n_active_experts, cfg.expert_weighting)


def expert_load(
    sae: SAE[Any],
    activations: ActivationSource,
    n_batches: int = 10,
    batch_size: int = 4096,
) -> ExpertLoad:
    """Expert load of a routed SAE over activations (tensor, ActivationsStore, iterable)."""
    layout = expert_layout(sae)
    if not layout.has_router:
        raise ValueError(
            f"expert_load needs a routed SAE (architecture 'scale' or 'switch'), got "
            f"{sae.cfg.architecture()!r}"
        )
    counter = ExpertLoadCounter(layout.n_experts)
    for batch in activation_batches(activations, n_batches, batch_size):
        counter.add(route_activations(sae, batch).experts)
    return counter.result()


def omega_per_expert(sae: SAE[Any]) -> list[float] | None:
    """Feature Scaling strength of each expert, or None if the SAE has no omega.

    Inference SAEs have Feature Scaling folded into W_enc and so no omega.
    """
    omega = getattr(sae, "omega", None)
    if not isinstance(omega, torch.Tensor) or not getattr(
        sae.cfg, "feature_scaling", False
    ):
        return None
    return omega.detach().float().cpu().tolist()


@torch.no_grad()
def explained_variance(
    sae: SAE[Any],
    activations: ActivationSource,
    n_batches: int = 10,
    batch_size: int = 4096,
) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the given activations."""
    count, total, sq_sum, err = 0, 0.0, None, 0.0
    for batch in activation_batches(activations, n_batches, batch_size):
        x = batch.to(sae.device).reshape(-1, sae.cfg.d_in).double()
        err += (sae(x.to(sae.dtype)).double() - x).pow(2).sum().item()
        total += x.pow(2).sum().item()
        sq_sum = x.sum(0) if sq_sum is None else sq_sum + x.sum(0)
        count += x.shape[0]
    if sq_sum is None or count == 0:
        raise ValueError("explained_variance got no activations")
    variance = total - sq_sum.pow(2).sum().item() / count
    return 1.0 - err / variance


# ------------------------------------------------------------------------ all at once


@dataclass(frozen=True)
class SAEMetrics:
    """Every metric of this module for one SAE."""

    architecture: str
    """SAELens architecture key."""
    layout: ExpertLayout
    """Expert layout (a dense SAE is one expert)."""
    encoder_flops_per_token: int
    """Encoder multiply-adds per token."""
    redundancy: Redundancy
    """Decoder redundancy, overall / intra / inter expert."""
    feature_dimensionality: FeatureDimensionality
    """Per-expert and usage-weighted feature dimensionality, network sparsity."""
    expert_load: ExpertLoad | None
    """Expert load (routed SAEs given activations only)."""
    omega: list[float] | None
    """Feature Scaling strength per expert (training SAEs with Feature Scaling only)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: scalars, plus lists for per-expert values."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_sae": self.layout.d_sae,
            "n_experts": self.layout.n_experts,
            "n_active_experts": self.layout.n_active_experts,
            "encoder_flops_per_token": self.encoder_flops_per_token,
            **self.redundancy.to_dict(),
            **self.feature_dimensionality.to_dict(),
        }
        if self.expert_load is not None:
            out |= self.expert_load.to_dict()
        if self.omega is not None:
            out["omega"] = list(self.omega)
        return out

    def to_log_dict(self, prefix: str = "") -> dict[str, float | int]:
        """Scalars only (lists expanded to "<key>/<i>"), for wandb."""
        out: dict[str, float | int] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, list):
                out |= {f"{prefix}{key}/{i}": v for i, v in enumerate(value)}
            elif isinstance(value, (int, float)):
                out[f"{prefix}{key}"] = value
        return out


def compute_sae_metrics(
    sae: SAE[Any],
    activations: ActivationSource | None = None,
    n_batches: int = 10,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> SAEMetrics:
    """All metrics for any SAELens SAE; expert load only for routed SAEs with activations."""
    layout = expert_layout(sae)
    load = (
        expert_load(sae, activations, n_batches)
        if layout.has_router and activations is not None
        else None
    )
    usage = None if load is None else load.selected_share
    return SAEMetrics(
        architecture=sae.cfg.architecture(),
        layout=layout,
        encoder_flops_per_token=encoder_flops_per_token(layout, sae.cfg.d_in),
        redundancy=decoder_redundancy(
            sae.W_dec, layout.n_experts, thresholds, max_block_bytes
        ),
        feature_dimensionality=feature_dimensionality(
            sae.W_dec, layout, usage, max_block_bytes
        ),
        expert_load=load,
        omega=omega_per_expert(sae),
    )


# ------------------------------------------------------------ training-time logging


def decoder_eval_metrics(
    sae: SAE[Any],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    prefix: str = "moe/",
) -> dict[str, float]:
    """Decoder-geometry scalars (redundancy, dimensionality) for an eval log."""
    layout = expert_layout(sae)
    values: dict[str, float] = {
        **decoder_redundancy(sae.W_dec, layout.n_experts, thresholds).to_dict(),
        "feature_dimensionality/global": feature_dimensionality(
            sae.W_dec, layout
        ).global_value,
    }
    return {f"{prefix}{key}": value for key, value in values.items()}


def decoder_histograms(sae: SAE[Any]) -> dict[str, Any]:
    """Per-latent max cosine (and omega) as arrays, for `TrainingSAE.log_histograms`."""
    layout = expert_layout(sae)
    cosines = max_cosines(sae.W_dec, layout.n_experts)
    out: dict[str, Any] = {"weights/W_dec_max_cosine": cosines.overall.cpu().numpy()}
    omega = omega_per_expert(sae)
    if omega is not None:
        out["weights/omega"] = torch.tensor(omega).numpy()
    return out


@dataclass
class DecoderMetricsEvaluator:
    """A SAELens trainer evaluator that adds `decoder_eval_metrics` to another's output."""

    inner: Evaluator | None
    """The runner's own evaluator (SAELens's run_evals, synthetic MCC, or None)."""
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    """Redundancy thresholds."""

    def __call__(
        self, sae: Any, data_provider: Any, activation_scaler: Any
    ) -> dict[str, Any]:
        """Run the inner evaluator, then add the decoder metrics."""
        inner = (
            {}
            if self.inner is None
            else self.inner(sae, data_provider, activation_scaler)
        )
        return {**inner, **decoder_eval_metrics(sae, self.thresholds)}


def add_decoder_metrics_to_evals(
    runner: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> None:
    """Make a SAELens runner's periodic evals also log decoder geometry.

    Works on `LanguageModelSAETrainingRunner` (wraps `runner.evaluator`) and on
    `SyntheticSAERunner` (wraps the evaluator it builds; needs eval_frequency > 0).
    Call it before `runner.run()`.
    """
    if hasattr(runner, "evaluator"):
        runner.evaluator = DecoderMetricsEvaluator(runner.evaluator, thresholds)
        return
    if not hasattr(runner, "_create_evaluator"):
        raise TypeError(f"cannot attach evals to {type(runner).__name__}")
    if runner.cfg.eval_frequency <= 0:
        raise ValueError(
            "SyntheticSAERunner runs evals only with eval_frequency > 0, got "
            f"{runner.cfg.eval_frequency}"
        )
    create = runner._create_evaluator
    runner._create_evaluator = lambda: DecoderMetricsEvaluator(create(), thresholds)


# ------------------------------------------------------------ ground-truth experts


def feature_trees(roots: Sequence[Any], num_features: int) -> torch.Tensor:
    """Index of the hierarchy tree each ground-truth feature belongs to, -1 if none.

    `roots` are sae_lens.synthetic HierarchyNode roots (SyntheticModel.hierarchy.roots).
    """
    trees = torch.full((num_features,), -1, dtype=torch.long)
    for tree, root in enumerate(roots):
        stack = [root]
        while stack:
            node = stack.pop()
            if node.feature_index is not None:
                trees[node.feature_index] = tree
            stack.extend(node.children)
    return trees


@dataclass(frozen=True)
class ExpertSpecialisation:
    """Which hierarchy trees each expert's latents match, and how concentrated."""

    tree_counts: list[dict[int, int]]
    """Per expert: tree index -> number of its matched latents in that tree."""
    purity: list[float | None]
    """Per expert: share of its matched latents in its most common tree (None if none)."""
    overall_purity: float
    """Purity over all matched latents (sum of per-expert majorities / matched)."""
    chance_purity: float
    """overall_purity with latents' trees shuffled across experts (same counts)."""
    n_matched: int
    """Latents whose best ground-truth match is in a tree and above min_cosine."""

    def to_dict(self) -> dict[str, Any]:
        """Keys "specialisation/..."."""
        return {
            "specialisation/purity": list(self.purity),
            "specialisation/overall_purity": self.overall_purity,
            "specialisation/chance_purity": self.chance_purity,
            "specialisation/n_matched": self.n_matched,
            "specialisation/tree_counts": [
                {str(k): v for k, v in counts.items()} for counts in self.tree_counts
            ],
        }


def _majority_purity(
    expert_of: torch.Tensor, tree_of: torch.Tensor, n_experts: int
) -> tuple[list[dict[int, int]], list[float | None], float]:
    counts: list[dict[int, int]] = []
    purity: list[float | None] = []
    majority_total = 0
    for expert in range(n_experts):
        trees = tree_of[expert_of == expert]
        values, freq = trees.unique(return_counts=True)
        counts.append(dict(zip(values.tolist(), freq.tolist(), strict=True)))
        top = int(freq.max()) if freq.numel() else 0
        majority_total += top
        purity.append(top / trees.numel() if trees.numel() else None)
    overall = majority_total / max(tree_of.numel(), 1)
    return counts, purity, overall


@torch.no_grad()
def expert_specialisation(
    W_dec: torch.Tensor,  # [d_sae, d_in]
    n_experts: int,
    gt_features: torch.Tensor,  # [num_features, d_in]
    trees: torch.Tensor,  # [num_features], tree index or -1
    min_cosine: float = 0.5,
    n_shuffles: int = 20,
    seed: int = 0,
) -> ExpertSpecialisation:
    """Purity of each expert's latents with respect to ground-truth hierarchy trees.

    `trees` can be any grouping of the true features (their domains, for instance):
    a latent counts for the group of the true feature nearest its decoder row.
    """
    cos = cosine_similarities(W_dec.detach().float(), gt_features.float()).abs()
    best_cos, best_feature = cos.max(dim=1)
    tree_of_latent = trees.to(best_feature.device)[best_feature]
    matched = (best_cos >= min_cosine) & (tree_of_latent >= 0)
    block = W_dec.shape[0] // n_experts
    expert_of = (torch.arange(W_dec.shape[0], device=W_dec.device) // block)[matched]
    tree_of = tree_of_latent[matched].cpu()
    expert_of = expert_of.cpu()
    counts, purity, overall = _majority_purity(expert_of, tree_of, n_experts)
    generator = torch.Generator().manual_seed(seed)
    shuffled = [
        _majority_purity(
            expert_of,
            tree_of[torch.randperm(tree_of.numel(), generator=generator)],
            n_experts,
        )[2]
        for _ in range(n_shuffles)
    ]
    chance = sum(shuffled) / max(len(shuffled), 1)
    return ExpertSpecialisation(counts, purity, overall, chance, int(matched.sum()))


# ---------------------------------------------------------------- domain routing


@torch.no_grad()
def expert_domain_counts(
    experts: torch.Tensor,  # [tokens, e], distinct expert indices per token
    domains: torch.Tensor,  # [tokens, n_domains] bool
    n_experts: int,
) -> torch.Tensor:
    """Joint weight of (selected expert, token domain) pairs. [n_experts, n_domains]

    Each token with a domain spreads a weight of 1 evenly over its e x |domains|
    (expert, domain) pairs, so the matrix sums to the number of such tokens.
    """
    domain_weights = domains.double()
    domain_weights = domain_weights / domain_weights.sum(-1, keepdim=True).clamp(min=1)
    selection = domain_weights.new_zeros(experts.shape[0], n_experts)
    selection.scatter_(1, experts.long().to(selection.device), 1 / experts.shape[1])
    return selection.T @ domain_weights.to(selection.device)


def _entropy(probabilities: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in nats along `dim` (0 log 0 = 0)."""
    return -torch.xlogy(probabilities, probabilities).sum(dim)


class _RoutingScores(NamedTuple):
    nmi: float
    mutual_information: float
    purity: list[float | None]
    domains_served: list[float | None]
    overall_purity: float
    mean_domains_served: float


def _routing_scores(counts: torch.Tensor) -> _RoutingScores:
    """NMI, purity and domains served from joint counts [n_experts, n_domains]."""
    joint = counts / counts.sum().clamp(min=1e-12)
    expert_share, domain_share = joint.sum(1), joint.sum(0)
    h_experts, h_domains = _entropy(expert_share), _entropy(domain_share)
    information = (h_experts + h_domains - _entropy(joint.flatten())).clamp(min=0)
    mean_entropy = (h_experts + h_domains) / 2
    nmi = (information / mean_entropy).item() if mean_entropy > 0 else 0.0
    loaded = expert_share > 0
    conditional = joint / expert_share.clamp(min=1e-12)[:, None]  # P(domain | expert)
    purity = conditional.max(dim=1).values
    served = _entropy(conditional).exp()
    return _RoutingScores(
        nmi=nmi,
        mutual_information=information.item(),
        purity=[
            p if ok else None
            for p, ok in zip(purity.tolist(), loaded.tolist(), strict=True)
        ],
        domains_served=[
            d if ok else None
            for d, ok in zip(served.tolist(), loaded.tolist(), strict=True)
        ],
        overall_purity=(expert_share * purity).sum().item(),
        mean_domains_served=(expert_share * served).sum().item(),
    )


def _mean_per_expert(runs: Sequence[list[float | None]]) -> list[float | None]:
    out: list[float | None] = []
    for values in zip(*runs, strict=True):
        present = [v for v in values if v is not None]
        out.append(sum(present) / len(present) if present else None)
    return out


@dataclass(frozen=True)
class RoutingSpecialisation:
    """How well a router's expert choice follows the tokens' known domains.

    Each score comes with its chance level: the same score with the domain labels
    shuffled across tokens, which keeps every expert's load and every domain's
    frequency and removes any link between them.
    """

    nmi: float
    """Mutual information of selected expert and domain over the mean of their
    entropies: 1 when experts and domains map one to one (e = 1, one domain per
    token), near 0 when routing ignores domains."""
    chance_nmi: float
    """`nmi` with shuffled domains."""
    mutual_information: float
    """Mutual information of selected expert and domain, in nats."""
    expert_share: list[float]
    """Share of the (expert, domain) weight each expert receives: its load. [n_experts]"""
    purity: list[float | None]
    """Per expert: share of its weight from its most common domain (None if unused)."""
    chance_purity: list[float | None]
    """`purity` with shuffled domains."""
    domains_served: list[float | None]
    """Per expert: effective number of domains it serves, exp(entropy of its domain
    distribution): 1 for one domain, k for k domains in equal parts."""
    chance_domains_served: list[float | None]
    """`domains_served` with shuffled domains."""
    overall_purity: float
    """Load-weighted mean of `purity`."""
    chance_overall_purity: float
    """`overall_purity` with shuffled domains."""
    mean_domains_served: float
    """Load-weighted mean of `domains_served`."""
    chance_mean_domains_served: float
    """`mean_domains_served` with shuffled domains."""

    def to_dict(self, prefix: str = "routing_specialisation/") -> dict[str, Any]:
        """Flat "<prefix><field>" keys; per-expert values as lists."""
        return {f"{prefix}{key}": value for key, value in self.__dict__.items()}


@torch.no_grad()
def routing_specialisation(
    experts: torch.Tensor,  # [tokens, e]
    domains: torch.Tensor,  # [tokens, n_domains] bool
    n_experts: int,
    n_shuffles: int = 20,
    seed: int = 0,
) -> RoutingSpecialisation:
    """Score a routed SAE's expert selection (`route_activations(...).experts`)
    against the tokens' domains, each score beside its chance level."""
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be at least 1, got {n_shuffles}")
    if experts.shape[0] != domains.shape[0]:
        raise ValueError(
            f"experts and domains need one row per token, got {experts.shape[0]} "
            f"and {domains.shape[0]}"
        )
    counts = expert_domain_counts(experts, domains, n_experts)
    scores = _routing_scores(counts)
    generator = torch.Generator().manual_seed(seed)
    shuffled = [
        _routing_scores(
            expert_domain_counts(
                experts,
                domains[torch.randperm(domains.shape[0], generator=generator)],
                n_experts,
            )
        )
        for _ in range(n_shuffles)
    ]
    share = counts.sum(1) / counts.sum().clamp(min=1e-12)
    return RoutingSpecialisation(
        nmi=scores.nmi,
        chance_nmi=statistics.fmean(s.nmi for s in shuffled),
        mutual_information=scores.mutual_information,
        expert_share=share.tolist(),
        purity=scores.purity,
        chance_purity=_mean_per_expert([s.purity for s in shuffled]),
        domains_served=scores.domains_served,
        chance_domains_served=_mean_per_expert([s.domains_served for s in shuffled]),
        overall_purity=scores.overall_purity,
        chance_overall_purity=statistics.fmean(s.overall_purity for s in shuffled),
        mean_domains_served=scores.mean_domains_served,
        chance_mean_domains_served=statistics.fmean(
            s.mean_domains_served for s in shuffled
        ),
    )
