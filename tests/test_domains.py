import pytest
import torch
from sae_lens.synthetic import HierarchyNode, SyntheticModel

from saelens_moe.domains import (
    DomainConfig,
    DomainSyntheticModel,
    assign_domains,
    feature_groups,
    in_and_out_probabilities,
)
from saelens_moe.ground_truth import SIZES, BenchmarkSize, synthetic_model_config

REALISTIC = BenchmarkSize(
    "realistic", 1536, 96, 1536, 8, 8, 1_000_000, 1024, 50_000, 64, 4, lr=1e-3
)
"""benchmarks/synthetic_realistic.py's REALISTIC (tests/benchmarks checks they agree)."""
QUICK = SIZES["quick"]
"""256 features: 12 trees of 21 and 4 lone features."""


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def quick_model(**domains: float) -> DomainSyntheticModel:
    config = DomainConfig(n_domains=4, **domains)  # type: ignore[arg-type]
    return DomainSyntheticModel(synthetic_model_config(QUICK, seed=0), config)


def test_DomainSyntheticModel_at_strength_0_draws_the_plain_models_batch() -> None:
    """The realistic ground truth, bit for bit, from the same random state."""
    config = synthetic_model_config(REALISTIC, seed=0)
    plain = SyntheticModel(config)
    independent = DomainSyntheticModel(config, DomainConfig(strength=0.0))
    for batch in (1, 1024):
        torch.manual_seed(7)
        expected = plain.sample(batch)
        torch.manual_seed(7)
        assert torch.equal(independent.sample(batch), expected)
    torch.testing.assert_close(
        independent.domain_generator.firing_probabilities,
        plain.activation_generator.firing_probabilities,
        rtol=0,
        atol=0,
    )


def test_DomainSyntheticModel_keeps_every_gate_firing_rate() -> None:
    model = quick_model(strength=0.9)
    _, feature_acts, _ = model.sample_with_domains(40_000)
    gates = model.layout.gate_of_group
    rate = (feature_acts[:, gates] > 0).double().mean(0)
    p = model.domain_generator.marginal_firing_probabilities[gates].double()
    standard_error = (p * (1 - p) / 40_000).sqrt()
    assert ((rate - p).abs() / standard_error).max() < 4.5


def test_DomainSyntheticModel_labels_agree_with_the_features_drawn() -> None:
    """At strength 1 (no gate capped at p_in = 1) no domain feature fires off its
    tokens' domains; at 0.5 the in-domain share of firing is q + s (1 - q)."""
    for strength in (1.0, 0.5):
        model = quick_model(strength=strength)
        _, feature_acts, domains = model.sample_with_domains(20_000)
        domain_of_feature = model.layout.domain_of_feature
        has_domain = domain_of_feature >= 0
        fires = feature_acts[:, has_domain] > 0
        in_domain = domains[:, domain_of_feature[has_domain]]
        share = (fires & in_domain).sum() / fires.sum()
        q = model.domain_generator.config.domain_probability
        assert share.item() == pytest.approx(q + strength * (1 - q), abs=0.01)
        if strength == 1.0:
            assert not (fires & ~in_domain).any()


def test_DomainSyntheticModel_tokens_have_one_or_two_distinct_domains() -> None:
    model = quick_model(strength=0.5, second_domain_probability=0.25)
    _, _, domains = model.sample_with_domains(20_000)
    per_token = domains.sum(-1)
    assert set(per_token.unique().tolist()) == {1, 2}
    assert per_token.eq(2).double().mean().item() == pytest.approx(0.25, abs=0.015)
    shares = domains.double().mean(0)
    assert shares.tolist() == pytest.approx([1.25 / 4] * 4, abs=0.015)


def test_domain_groups_are_whole_trees_shared_out_evenly() -> None:
    """Quick size: 12 trees of 21 features, 4 lone ones, 4 domains. Tree 0 (the most
    frequent root) is domain-free (21 of the 32 features allowed); trees 1-11 go to
    domains 0 1 2 3 3 2 1 0 0 1 2, then the lone features to 3 3 2 1."""
    layout = quick_model().layout
    domain_of_group = layout.domain_of_group
    assert domain_of_group[0] == -1  # tree 0 has the most frequent root
    trees = layout.group_of_feature[layout.gate_of_group[:12]]
    assert trees.tolist() == list(range(12))
    per_domain = torch.bincount(layout.domain_of_feature + 1, minlength=5)
    assert per_domain.tolist() == [21, 63, 64, 64, 44]


def test_feature_groups_by_hand() -> None:
    roots = [
        HierarchyNode(2, [HierarchyNode(0)]),
        HierarchyNode(4, [HierarchyNode(3), HierarchyNode(5)]),
    ]
    hierarchy = type("Forest", (), {"roots": roots})()
    groups, gates = feature_groups(hierarchy, 7)
    assert groups.tolist() == [0, 2, 0, 1, 1, 1, 3]
    assert gates.tolist() == [2, 4, 1, 6]
    groups, gates = feature_groups(None, 3)
    assert groups.tolist() == [0, 1, 2] and gates.tolist() == [0, 1, 2]


def test_assign_domains_frees_the_most_frequent_then_deals_in_snake_order() -> None:
    probability = torch.tensor([0.01, 0.5, 0.2, 0.3, 0.05, 0.1, 0.02, 0.03])
    size = torch.tensor([1, 3, 1, 1, 1, 1, 1, 1])  # 10 features
    config = DomainConfig(n_domains=3, domain_free_share=0.4)
    # free: groups 1 and 3 (4 features, the budget 0.4 * 10); then by probability
    # groups 2, 5, 4 | 7, 6, 0 go to domains 0, 1, 2 | 2, 1, 0
    assert assign_domains(probability, size, config).tolist() == [
        0,
        -1,
        0,
        -1,
        2,
        1,
        1,
        2,
    ]


def test_in_and_out_probabilities_keep_the_marginal() -> None:
    p = torch.tensor([0.001, 0.02, 0.05, 0.2])
    config = DomainConfig(n_domains=10, strength=0.8, second_domain_probability=0.0)
    q = config.domain_probability
    p_in, p_out = in_and_out_probabilities(p, config)
    torch.testing.assert_close(q * p_in + (1 - q) * p_out, p)
    # uncapped gates: p_out = (1 - s) p
    torch.testing.assert_close(p_out[:2], 0.2 * p[:2])
    assert p_in[3] == 1.0  # capped
    same_in, same_out = in_and_out_probabilities(p, DomainConfig(strength=0.0))
    assert torch.equal(same_in, p) and torch.equal(same_out, p)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_domains", 1),
        ("strength", 1.5),
        ("second_domain_probability", -0.1),
        ("domain_free_share", 1.0),
    ],
)
def test_DomainConfig_refuses_values_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DomainConfig(**{field: value})  # type: ignore[arg-type]
