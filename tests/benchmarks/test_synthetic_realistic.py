from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from saelens_moe.ground_truth import SIZES, Variant, run_benchmark
from saelens_moe.lazy_adam import DENSE_STEP_FRACTION, LazyAdam
from saelens_moe.saes.scale_sae import ScaleTrainingSAE, ScaleTrainingSAEConfig
from tests.benchmarks import load_benchmark
from tests.benchmarks.test_synthetic import load_script


def load_realistic() -> ModuleType:
    return load_benchmark("synthetic_realistic")


def test_realistic_size_is_the_one_synthetic_py_offers() -> None:
    realistic = load_realistic().REALISTIC
    assert load_script().BENCHMARK_SIZES["realistic"] == realistic
    assert realistic.num_features >= 1536
    assert realistic.d_sae >= 1536
    assert realistic.n_experts >= 8


def test_replayed_stream_trains_exactly_as_the_live_generator() -> None:
    variants = [Variant("topk", "topk"), Variant("scale", "scale", {"k": 4})]
    live = run_benchmark(variants, SIZES["tiny"], seed=3)
    replayed = run_benchmark(variants, SIZES["tiny"], seed=3, replay=True)
    assert [r.explained_variance for r in live.results] == [
        r.explained_variance for r in replayed.results
    ]


def test_redundancy_breakdown_by_hand() -> None:
    """Latents 0 and 1 duplicate (one live, one dead); 2 and 3 in expert 1 point apart."""
    W_dec = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    )
    live = torch.tensor([True, False, True, True])
    out = load_realistic().redundancy_breakdown(W_dec, 2, live)
    assert out["n_live"] == 3
    assert out["raw/all/0.8"] == 0.5  # latents 0 and 1
    assert out["raw/live/0.8"] == 0.0  # no live latent has a live duplicate
    assert out["raw/intra/0.8"] == 0.5
    assert out["raw/inter/0.8"] == 0.0
    assert out["pairs/live-dead/0.8"] == 0.5
    assert out["pairs/live-live/0.8"] == 0.0
    # high-pass: expert 0's rows minus their mean point in opposite directions
    assert out["highpass/all/0.8"] == 0.0


def test_redundancy_breakdown_counts_pairs_with_a_revived_latent() -> None:
    W_dec = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    )
    live = torch.tensor([True, True, True, True])
    revived = torch.tensor([False, True, False, False])
    out = load_realistic().redundancy_breakdown(W_dec, 2, live, revived)
    assert out["n_revived"] == 1
    assert out["pairs/revived/0.8"] == 0.5  # latent 1, and latent 0 whose twin it is
    assert out["pairs/live-live/0.8"] == 0.5
    without = load_realistic().redundancy_breakdown(W_dec, 2, live)
    assert "n_revived" not in without and "pairs/revived/0.8" not in without


def test_duplicated_latents_are_matched_to_true_features_by_firing_rank() -> None:
    """Latents 0 and 1 both stand for feature 2, the most frequent; 2 and 3 for 0, 1.

    On three tokens latent 0 fires on the first two, latent 1 on the last two,
    latent 2 on all, latent 3 never."""
    features = torch.eye(3)
    model = SimpleNamespace(
        feature_dict=SimpleNamespace(feature_vectors=2 * features),
        activation_generator=SimpleNamespace(
            firing_probabilities=torch.tensor([0.1, 0.05, 0.4])
        ),
    )
    W_dec = torch.tensor(
        [[0.0, 0.0, 1.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.2]]
    )
    fires = torch.tensor(
        [
            [True, False, True, False],
            [True, True, True, False],
            [False, True, True, False],
        ]
    )
    found = load_realistic().duplicated_features(W_dec, model, fires)
    assert found == pytest.approx(
        {
            "latents": 2,
            "features": 1,
            "most_copies": 2,
            "median_rank": 0,  # feature 2 fires most often
            "median_rank_live": 0,  # ranks 0, 0, 1: the median of three
            "true_cosine": 1 / 1.25**0.5,  # the lower middle of 1 and latent 1's
            "true_cosine_live": 1.0,
            "co_firing": 1
            / 3,  # both fire on the middle token of the three either does
        }
    )


def test_dead_spells_mark_latents_that_stopped_firing_for_the_window() -> None:
    """Latent 0 fires every step, 1 only at step 150, 2 for the first 50 steps."""
    module = load_realistic()
    step = {"n": 0}

    def training_forward_pass(step_input: Any) -> SimpleNamespace:
        n = step["n"] = step["n"] + 1
        acts = torch.tensor([[1.0, float(n == 150), float(n <= 50)]])
        return SimpleNamespace(feature_acts=acts.to_sparse() if n % 2 else acts)

    sae = SimpleNamespace(
        cfg=SimpleNamespace(d_sae=3), training_forward_pass=training_forward_pass
    )
    spells = module.DeadSpells()
    spells.watch(sae)
    for _ in range(140):
        sae.training_forward_pass(None)
    assert spells.ever_dead.tolist() == [False, True, False]
    for _ in range(60):
        sae.training_forward_pass(None)
    assert spells.ever_dead.tolist() == [False, True, True]
    assert module.DEAD_SPELL_STEPS == 100


def test_geometric_median_resists_an_outlier() -> None:
    """Square corners and a far point: the minimum of the summed distances lies on
    the diagonal at t = 1/2 + 1/(2 sqrt 3) (zero derivative), whatever the outlier's
    distance; the mean moves ten units out."""
    points = torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [50.0, 50.0]]
    )
    median = load_realistic().geometric_median(points)
    t = 0.5 + 0.5 / 3**0.5
    assert torch.allclose(median, torch.tensor([t, t]), atol=1e-4)


def _scale_sae() -> ScaleTrainingSAE:
    torch.manual_seed(0)
    return ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=8, d_sae=32, n_experts=4, k=4, n_active_experts=2)
    )


def test_dictionary_learning_init() -> None:
    """Encoder in +-1/sqrt(d_in), decoder its unit rows, b_dec the median, b_enc 0."""
    module = load_realistic()
    sae = _scale_sae()
    stream = torch.randn(2048, 8) + 3.0
    module.dictionary_learning_init(sae, stream)
    assert sae.W_enc.abs().max() <= 8**-0.5
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32))
    cosines = torch.cosine_similarity(sae.W_dec, sae.W_enc.T, dim=-1)
    assert torch.allclose(cosines, torch.ones(32))
    assert torch.all(sae.get_parameter("b_enc") == 0)
    first_batch = stream[: module.REALISTIC.batch_size]
    assert torch.allclose(sae.b_dec, module.geometric_median(first_batch))
    assert not torch.allclose(sae.b_dec, torch.zeros(8))


def test_decoder_columns_are_unit_norm_at_every_step() -> None:
    module = load_realistic()
    sae = _scale_sae()
    module.normalise_decoder_columns(sae, torch.empty(0))
    assert not torch.allclose(sae.W_dec.norm(dim=0), torch.ones(8))
    sae.training_forward_pass(
        TrainStepInput(
            sae_in=torch.randn(16, 8),
            coefficients={"load_balancing": 1.0},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(8))


def test_token_tables_set_scale_against_switch_per_token_count() -> None:
    def row(name: str, tokens: int, ev: float) -> dict[str, Any]:
        return {
            "name": name,
            "tokens": tokens,
            "explained_variance": ev,
            "mcc": 0.4,
            "dead_latents": 0,
            "redundancy_08": 0.0,
            "redundancy_09": 0.0,
            "breakdown": {"n_revived": 3.0},
        }

    rows = [
        row("switch", 1000, 0.5),
        row("scale e=2", 1000, 0.6),
        row("topk", 1000, 0.8),
    ]
    table = load_realistic().token_tables(rows)
    # FVU 0.4 vs 0.5 is a 20% cut; TopK's 0.2 vs Scale's 0.4, 50%
    assert "| 1,000 | +20% | - | - | +50% |" in table.splitlines()


def test_improvement_table_sets_ours_beside_the_authors() -> None:
    module = load_realistic()
    entries = [
        {
            "name": "switch",
            "k": 8,
            "explained_variance": 0.5,
            "redundancy_08": 0.2,
            "redundancy_09": 0.1,
        },
        {
            "name": "scale e=2",
            "k": 8,
            "explained_variance": 0.75,
            "redundancy_08": 0.02,
            "redundancy_09": 0.01,
        },
    ]
    table = module.improvement_table(entries)
    row = next(line for line in table.splitlines() if line.startswith("| 8 | 2 |"))
    # ours: FVU 0.25 vs 0.5 and redundancy 0.01 vs 0.1; authors: 2359.5 vs 2908.5, 0.00346 vs 0.0493
    assert row == "| 8 | 2 | +50% | +19% | +90% | +93% | +90% |"


def _lazy_step(
    optimizer: torch.optim.Optimizer, sae: ScaleTrainingSAE, tokens: int
) -> None:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=torch.randn(tokens, 8),
            coefficients={"load_balancing": 1.0},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_updated_shares_record_each_lazy_adam_step_and_count_dense_ones_whole() -> None:
    """Each of 2 experts of 16 latents is selected for every token, K 8: one token
    reaches under half the latents, 512 every one."""
    module = load_realistic()
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=8, d_sae=32, n_experts=2, k=8, n_active_experts=2)
    )
    lazy = LazyAdam(sae, lr=1e-3)
    other = torch.optim.Adam(_scale_sae().parameters())
    with module.updated_shares() as shares:
        _lazy_step(lazy, sae, tokens=1)
        partial_share = lazy.last_touched_share
        _lazy_step(lazy, sae, tokens=512)
        dense_share = lazy.last_touched_share
        other.step()
    _lazy_step(lazy, sae, tokens=1)  # after the block: not recorded
    assert partial_share is not None and 0 < partial_share < DENSE_STEP_FRACTION
    assert dense_share is not None and dense_share >= DENSE_STEP_FRACTION
    assert shares == [partial_share, 1.0]


def test_optimizer_table_gives_the_updated_share_of_lazy_rows_only() -> None:
    def row(name: str, seed: int, share: float | None) -> dict[str, Any]:
        entry = {
            "name": name,
            "k": 8,
            "seed": seed,
            "explained_variance": 0.5,
            "mcc": 0.4,
            "dead_latents": 0,
        }
        return entry if share is None else {**entry, "updated_share": share}

    rows = [row("dense", 0, None), row("lazy", 0, 0.3), row("lazy", 1, 0.5)]
    lines = load_realistic().optimizer_table(rows).splitlines()
    assert lines[2].startswith("| dense | 8 | 0 |") and lines[2].endswith("| all |")
    assert lines[3].startswith("| lazy | 8 | 0,1 |") and lines[3].endswith("| 40% |")
