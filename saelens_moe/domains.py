"""A synthetic ground truth whose features belong to known domains.

Language-model features come in contexts (code, a language, a topic) that co-occur;
`sae_lens.synthetic` features fire independently, apart from weak low-rank
correlations and their hierarchy. `DomainSyntheticModel` adds domains on top of any
`SyntheticModelConfig` and keeps the features' firing rates. The generative process,
with strength s in [0, 1], D domains and q = (1 + p2) / D the chance that a given
domain is one of a token's domains:

1. Features form groups: each hierarchy tree is one group, each feature outside a
   tree a group of its own. The most frequent groups, `domain_free_share` of the
   features, are domain-free; the others are dealt to the D domains in snake order
   of firing probability (so domains get similar firing mass).
2. Each token draws a primary domain uniformly and, with probability p2
   (`second_domain_probability`), a second, different one.
3. The base generator (Zipf firing, low-rank correlation, hierarchy) draws the
   token's features, with each domain group's gate (its root, or the lone feature)
   raised from its firing probability p to p_in = min(1, p (1 + s (1 - q) / q)).
4. Each domain group outside the token's domains is dropped whole with probability
   1 - p_out / p_in, where p_out = (p - q p_in) / (1 - q) (= (1 - s) p uncapped).

Every gate then still fires with probability q p_in + (1 - q) p_out = p, and a share
q + s (1 - q) of its firing falls on tokens of its own domain (less where p_in is
capped at 1). Features below a gate fire only with it, so they keep their rates too
(up to the weak low-rank correlation with their gate's raised threshold). At s = 0 nothing is raised or dropped: a batch equals the one the
plain `SyntheticModel` draws from the same random state (the domain labels are drawn
after it), so strength 0 is the independent ground truth.

The domain machinery is not expressible with `sae_lens.synthetic`'s own tools (its
Gaussian-copula correlations cannot make a token choose one or two domains), so it
wraps the `ActivationGenerator` that `SyntheticModel` builds.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    Hierarchy,
    SyntheticModel,
    SyntheticModelConfig,
)
from typing_extensions import override

from saelens_moe.metrics import feature_trees


@dataclass(frozen=True)
class DomainConfig:
    """How features cluster into domains.

    Args:
        n_domains: Number of domains D the domain groups are dealt to (at least 2).
        strength: s in [0, 1]; 0 is the independent ground truth, 1 removes every
            out-of-domain firing a feature's firing rate allows.
        second_domain_probability: Chance p2 that a token has a second domain.
        domain_free_share: Share of the features, taken from the most frequent
            groups, that fire in every domain.
    """

    n_domains: int = 16
    strength: float = 0.0
    second_domain_probability: float = 0.5
    domain_free_share: float = 0.125

    def __post_init__(self) -> None:
        if self.n_domains < 2:
            raise ValueError(f"n_domains must be at least 2, got {self.n_domains}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 <= self.second_domain_probability <= 1.0:
            raise ValueError(
                "second_domain_probability must be in [0, 1], got "
                f"{self.second_domain_probability}"
            )
        if not 0.0 <= self.domain_free_share < 1.0:
            raise ValueError(
                f"domain_free_share must be in [0, 1), got {self.domain_free_share}"
            )

    @property
    def domain_probability(self) -> float:
        """q = (1 + p2) / D: the chance that a given domain is one of a token's."""
        return (1 + self.second_domain_probability) / self.n_domains


class DomainLayout(NamedTuple):
    """Which group each feature belongs to and which domain each group serves."""

    group_of_feature: torch.Tensor
    """Group index of every feature (its tree, or a group of its own). [num_features]"""
    gate_of_group: torch.Tensor
    """Feature whose firing gates each group: a tree's root, or the lone feature. [groups]"""
    domain_of_group: torch.Tensor
    """Domain of each group, -1 for domain-free. [groups]"""

    @property
    def domain_of_feature(self) -> torch.Tensor:
        """Domain of every feature, -1 for domain-free. [num_features]"""
        return self.domain_of_group[self.group_of_feature]


def feature_groups(
    hierarchy: Hierarchy | None, num_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group of each feature [num_features] and the gate feature of each group [groups].

    Trees come first (group t is `hierarchy.roots[t]`), then one group per feature
    outside every tree, in feature order.
    """
    roots = [] if hierarchy is None else hierarchy.roots
    gates = [root.feature_index for root in roots]
    if None in gates:
        raise ValueError("every hierarchy root needs a feature to gate its tree")
    groups = feature_trees(roots, num_features)
    lone = (groups < 0).nonzero().squeeze(-1)
    groups[lone] = len(roots) + torch.arange(lone.numel())
    gate_of_group = torch.cat([torch.tensor(gates, dtype=torch.long), lone])
    return groups, gate_of_group


def assign_domains(
    gate_probability: torch.Tensor,  # [groups]
    group_size: torch.Tensor,  # [groups]
    config: DomainConfig,
) -> torch.Tensor:
    """Domain of each group (-1: domain-free) by firing probability. [groups]

    The most frequent groups are domain-free while their features fit in
    `domain_free_share`; the rest go to domains 0, 1, ..., D-1, D-1, ..., 0, 0, ...
    in decreasing probability.
    """
    order = gate_probability.argsort(descending=True, stable=True)
    budget = config.domain_free_share * int(group_size.sum())
    n_free = int((group_size[order].cumsum(0) <= budget).sum())
    position = torch.arange(order.numel() - n_free)
    lap, seat = position // config.n_domains, position % config.n_domains
    snake = torch.where(lap % 2 == 0, seat, config.n_domains - 1 - seat)
    domain_of_group = torch.full_like(order, -1)
    domain_of_group[order[n_free:]] = snake
    return domain_of_group


def in_and_out_probabilities(
    p: torch.Tensor, config: DomainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate firing probabilities on a token of the group's domain and off it.

    p_in = min(1, p (1 + s (1 - q) / q)) and p_out = (p - q p_in) / (1 - q), so
    q p_in + (1 - q) p_out = p.
    """
    q, s = config.domain_probability, config.strength
    raised = p * (1 + s * (1 - q) / q)
    capped = raised >= 1
    p_in = torch.where(capped, 1.0, raised)
    # uncapped, (p - q p_in) / (1 - q) is p (1 - s): written so, it is exactly 0 at s = 1
    p_out = torch.where(capped, (p - q) / (1 - q), p * (1 - s)).clamp(min=0.0)
    return p_in, p_out


class DomainActivationGenerator(ActivationGenerator):
    """An `ActivationGenerator` whose tokens draw their features from their domains.

    Built from the plain generator's parts with the domain gates' probabilities
    raised to p_in (`firing_probabilities` holds the raised ones, what the base draw
    uses; `marginal_firing_probabilities` the rates the tokens show);
    `sample_with_domains` also returns each token's domains.
    """

    def __init__(
        self,
        base: ActivationGenerator,
        model: SyntheticModel,
        config: DomainConfig,
    ) -> None:
        marginal = base.firing_probabilities
        group_of_feature, gate_of_group = feature_groups(
            model.hierarchy, base.num_features
        )
        domain_of_group = assign_domains(
            marginal[gate_of_group],
            torch.bincount(group_of_feature, minlength=gate_of_group.numel()),
            config,
        )
        layout = DomainLayout(group_of_feature, gate_of_group, domain_of_group)
        p_in, p_out = in_and_out_probabilities(marginal[gate_of_group], config)
        has_domain = domain_of_group >= 0
        raised = marginal.clone()
        raised[gate_of_group[has_domain]] = p_in[has_domain]
        super().__init__(
            num_features=base.num_features,
            firing_probabilities=raised,
            std_firing_magnitudes=base.std_firing_magnitudes,
            mean_firing_magnitudes=base.mean_firing_magnitudes,
            modify_activations=base.modify_activations,
            correlation_matrix=model.correlation_matrix,
            device=marginal.device,
            dtype=marginal.dtype,
        )
        self.config = config
        self.layout = layout
        self.marginal_firing_probabilities = marginal  # [num_features]
        keep = torch.where(p_in > 0, p_out / p_in.clamp(min=1e-12), 1.0)
        self.keep_out_of_domain = torch.where(has_domain, keep, 1.0)  # [groups]

    def draw_domains(self, batch_size: int) -> torch.Tensor:
        """Each token's domains: a primary one, and a second with probability p2.

        [batch_size, n_domains] bool.
        """
        n_domains = self.config.n_domains
        device = self.firing_probabilities.device
        primary = torch.randint(n_domains, (batch_size,), device=device)
        second = (
            primary + torch.randint(1, n_domains, (batch_size,), device=device)
        ) % n_domains
        has_second = (
            torch.rand(batch_size, device=device)
            < self.config.second_domain_probability
        )
        domains = torch.zeros(batch_size, n_domains, dtype=torch.bool, device=device)
        tokens = torch.arange(batch_size, device=device)
        domains[tokens, primary] = True
        domains[tokens[has_second], second[has_second]] = True
        return domains

    @torch.no_grad()
    def sample_with_domains(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature activations [batch, num_features] and domains [batch, n_domains]."""
        feature_acts = super().sample(batch_size)
        if feature_acts.is_sparse:
            raise ValueError("DomainActivationGenerator needs use_sparse_tensors=False")
        domains = self.draw_domains(batch_size)
        domain_of_group = self.layout.domain_of_group.to(domains.device)
        in_domain = (domain_of_group < 0) | domains[:, domain_of_group.clamp(min=0)]
        out_kept = torch.rand(in_domain.shape, device=domains.device) < (
            self.keep_out_of_domain.to(domains.device)
        )
        kept = (in_domain | out_kept)[:, self.layout.group_of_feature]
        return feature_acts * kept, domains

    @override
    def sample(self, batch_size: int) -> torch.Tensor:
        return self.sample_with_domains(batch_size)[0]


class DomainSyntheticModel(SyntheticModel):
    """A `SyntheticModel` whose features belong to domains (see the module docstring).

    Training and evaluation code that takes a `SyntheticModel` sees the domain
    structure through `sample`; `sample_with_domains` adds each token's domains.
    """

    def __init__(
        self,
        cfg: SyntheticModelConfig,
        domains: DomainConfig,
        device: str = "cpu",
    ) -> None:
        # read by _create_activation_generator, which SyntheticModel's __init__ calls
        self.domain_config = domains
        super().__init__(cfg, device=device)

    @override
    def _create_activation_generator(
        self, use_sparse_tensors: bool = False
    ) -> ActivationGenerator:
        if use_sparse_tensors:
            raise ValueError("DomainSyntheticModel needs use_sparse_tensors=False")
        base = super()._create_activation_generator()
        return DomainActivationGenerator(base, self, self.domain_config)

    @property
    def domain_generator(self) -> DomainActivationGenerator:
        """The activation generator, which knows the domains."""
        generator = self.activation_generator
        if not isinstance(generator, DomainActivationGenerator):
            raise TypeError(
                f"activation_generator was replaced by a {type(generator).__name__}"
            )
        return generator

    @property
    def layout(self) -> DomainLayout:
        """Groups, their gates and their domains."""
        return self.domain_generator.layout

    @torch.no_grad()
    def sample_with_domains(
        self, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden activations [batch, hidden_dim], their feature activations
        [batch, num_features] and the tokens' domains [batch, n_domains] (bool)."""
        feature_acts, domains = self.domain_generator.sample_with_domains(batch_size)
        return self.feature_dict(feature_acts), feature_acts, domains
