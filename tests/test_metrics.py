import json
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.synthetic import HierarchyNode

from saelens_moe import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from saelens_moe.metrics import (
    DEFAULT_BLOCK_BYTES,
    DecoderMetricsEvaluator,
    ExpertLayout,
    add_decoder_metrics_to_evals,
    compute_sae_metrics,
    decoder_histograms,
    decoder_redundancy,
    encoder_flops_per_token,
    expert_domain_counts,
    expert_layout,
    expert_load,
    expert_specialisation,
    explained_variance,
    feature_dimensionality,
    feature_trees,
    highpass_decoder,
    latent_dimensionality,
    max_cosines,
    omega_per_expert,
    redundancy_scope,
    route_activations,
    routing_specialisation,
    row_blocks,
)
from saelens_moe.router_health import (
    ExpertLoadCounter,
    normalized_entropy,
    routing_metrics,
)
from saelens_moe.saes.moe import Routing, load_balance_ratio, routing_counts
from tests.helpers import TINY_D_MODEL, build_tiny_gpt2, build_token_dataset


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def basis(*indices: int, dim: int = 8) -> torch.Tensor:
    """Rows e_i of the standard basis (duplicates allowed)."""
    return torch.eye(dim)[list(indices)]


def scale_sae(**overrides: Any) -> ScaleTrainingSAE:
    fields: dict[str, Any] = {
        "d_in": 12,
        "d_sae": 48,
        "n_experts": 6,
        "n_active_experts": 3,
        "k": 10,
        **overrides,
    }
    return ScaleTrainingSAE(ScaleTrainingSAEConfig(**fields))


# ------------------------------------------------------------------ redundancy


def test_max_cosines_duplicated_rows_have_redundancy_one() -> None:
    W_dec = basis(0, 0, 1, 2)
    redundancy = decoder_redundancy(W_dec)
    # latents 0 and 1 are duplicates (cosine 1); 2 and 3 are orthogonal to all
    assert redundancy.overall.fraction_above == {0.7: 0.5, 0.8: 0.5, 0.9: 0.5}
    assert redundancy.overall.mean_max_cosine == pytest.approx(0.5)
    assert redundancy.intra_expert is None
    assert redundancy.inter_expert is None


def test_max_cosines_split_intra_and_inter_expert_by_hand() -> None:
    # expert 0 = latents {0, 1}: two copies of e0; expert 1 = {2, 3}: e1 and e0
    W_dec = basis(0, 0, 1, 0)
    cosines = max_cosines(W_dec, n_experts=2)
    assert cosines.overall.tolist() == pytest.approx([1, 1, 0, 1])
    assert cosines.intra_expert is not None
    assert cosines.inter_expert is not None
    assert cosines.intra_expert.tolist() == pytest.approx([1, 1, 0, 0])
    assert cosines.inter_expert.tolist() == pytest.approx([1, 1, 0, 1])
    redundancy = decoder_redundancy(W_dec, n_experts=2, thresholds=(0.9,))
    assert redundancy.overall.fraction_above[0.9] == 0.75
    assert redundancy.intra_expert is not None
    assert redundancy.intra_expert.fraction_above[0.9] == 0.5
    assert redundancy.inter_expert is not None
    assert redundancy.inter_expert.fraction_above[0.9] == 0.75
    assert redundancy.to_dict()["redundancy/intra_expert/0.9"] == 0.5


def test_max_cosines_uses_cosine_not_dot_product() -> None:
    angle = math.radians(30)
    W_dec = torch.tensor([[5.0, 0.0], [0.1 * math.cos(angle), 0.1 * math.sin(angle)]])
    assert max_cosines(W_dec).overall.tolist() == pytest.approx([math.cos(angle)] * 2)


def test_max_cosines_in_blocks_matches_the_full_matrix() -> None:
    W_dec = torch.randn(60, 5)
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(float("-inf"))
    same_expert = torch.arange(60)[:, None] // 10 == torch.arange(60)[None, :] // 10
    tiny_budget = 3 * 4 * (60 + 10)  # three rows per block
    cosines = max_cosines(W_dec, n_experts=6, max_block_bytes=tiny_budget)
    torch.testing.assert_close(cosines.overall, full.max(-1).values)
    assert cosines.intra_expert is not None and cosines.inter_expert is not None
    intra = full.masked_fill(~same_expert, float("-inf")).max(-1).values
    inter = full.masked_fill(same_expert, float("-inf")).max(-1).values
    torch.testing.assert_close(cosines.intra_expert, intra)
    torch.testing.assert_close(cosines.inter_expert, inter)


def test_row_blocks_cover_every_row_once_within_the_budget() -> None:
    blocks = list(row_blocks(10, row_bytes=8, max_block_bytes=24))
    assert [(b.start, b.stop) for b in blocks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(row_blocks(2, row_bytes=100, max_block_bytes=1)) == [
        slice(0, 1),
        slice(1, 2),
    ]


def test_default_blocks_at_d_sae_24576_stay_well_under_1_gb() -> None:
    """Planned peak: unit rows plus one similarity block (the full matrix is 2.4 GB)."""
    d_sae, d_in, n_experts = 24576, 768, 64
    row_bytes = 4 * (d_sae + d_sae // n_experts)
    blocks = list(row_blocks(d_sae, row_bytes, DEFAULT_BLOCK_BYTES))
    largest = max(b.stop - b.start for b in blocks) * row_bytes
    unit_rows = 4 * d_sae * d_in
    assert largest <= DEFAULT_BLOCK_BYTES
    assert unit_rows + largest < 0.5 * 2**30
    assert sum(b.stop - b.start for b in blocks) == d_sae


def test_max_cosines_peak_memory_follows_the_block_budget() -> None:
    """Measured in a fresh process: growth stays near the budget, far below the matrix."""
    script = (
        "import resource, torch\n"
        "from saelens_moe.metrics import max_cosines\n"
        "W = torch.randn(12288, 8)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "max_cosines(W, n_experts=32, max_block_bytes=64 * 2**20)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    growth_bytes = int(out.stdout.strip().splitlines()[-1])
    full_matrix_bytes = 4 * 12288**2  # 604 MB
    assert growth_bytes < 200 * 2**20 < full_matrix_bytes


# ------------------------------------------------------- feature dimensionality


def test_feature_dimensionality_orthogonal_rows_are_one() -> None:
    assert latent_dimensionality(basis(0, 1, 2, 3)).tolist() == pytest.approx([1] * 4)


def test_feature_dimensionality_by_hand() -> None:
    angle = math.radians(60)
    tilted = [math.cos(angle), math.sin(angle), 0.0]
    # expert 0: e0 and a row at 60 degrees from it; expert 1: e2 twice
    W_dec = torch.tensor([[1.0, 0, 0], tilted, [0, 0, 1.0], [0, 0, 1.0]])
    per_latent = latent_dimensionality(W_dec, n_experts=2)
    one_over = 1 / (1 + math.cos(angle) ** 2)  # 0.8
    assert per_latent.tolist() == pytest.approx([one_over, one_over, 0.5, 0.5])
    layout = ExpertLayout(d_sae=4, n_experts=2, n_active_experts=1, has_router=True)
    result = feature_dimensionality(W_dec, layout, usage=[0.75, 0.25])
    assert result.per_expert == pytest.approx([0.8, 0.5])
    assert result.global_value == pytest.approx(0.75 * 0.8 + 0.25 * 0.5)
    assert result.network_sparsity == 0.5
    uniform = feature_dimensionality(W_dec, layout)
    assert uniform.global_value == pytest.approx(0.65)


def test_feature_dimensionality_ignores_other_experts() -> None:
    per_latent = latent_dimensionality(basis(0, 0), n_experts=2)
    assert per_latent.tolist() == pytest.approx([1.0, 1.0])


# ----------------------------------------------------------------- expert load


def test_normalized_entropy_one_hot_is_zero_and_uniform_is_one() -> None:
    assert normalized_entropy(torch.tensor([0.0, 5.0, 0.0])) == pytest.approx(0.0)
    assert normalized_entropy(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(1.0)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert normalized_entropy(torch.tensor([3.0, 1.0])) == pytest.approx(expected)


def test_expert_load_counter_by_hand() -> None:
    counter = ExpertLoadCounter(n_experts=4)
    counter.add(torch.tensor([[0, 1], [0, 2]]))
    counter.add(torch.tensor([[1, 0]]))
    load = counter.result()
    assert load.n_tokens == 3
    assert load.selected_share == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert load.first_choice_share == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert load.never_selected == [3]
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert load.selected_entropy == pytest.approx(
        float(-(p * p.log()).sum()) / math.log(4)
    )


def test_expert_load_of_one_hot_routing_has_zero_entropy() -> None:
    sae = SwitchTrainingSAE(
        SwitchTrainingSAEConfig(d_in=12, d_sae=48, n_experts=6, k=4)
    )
    with torch.no_grad():
        sae.b_router[2] = 1e4
    load = expert_load(sae, torch.randn(300, 12), batch_size=128)
    assert load.n_tokens == 300
    assert load.selected_entropy == pytest.approx(0.0)
    assert load.first_choice_entropy == pytest.approx(0.0)
    assert load.never_selected == [0, 1, 3, 4, 5]
    assert load.selected_share[2] == 1.0


def test_expert_load_counts_every_selected_expert() -> None:
    sae = scale_sae()
    x = torch.randn(64, 12)
    load = expert_load(sae, x)
    routing = route_activations(sae, x)
    counts = torch.bincount(routing.experts.flatten(), minlength=6) / 64
    assert load.selected_share == pytest.approx(counts.tolist())
    assert sum(load.selected_share) == pytest.approx(3.0)
    assert sum(load.first_choice_share) == pytest.approx(1.0)


def test_expert_load_refuses_a_dense_sae() -> None:
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=48, k=4))
    with pytest.raises(ValueError, match="routed SAE"):
        expert_load(sae, torch.randn(4, 12))


# --------------------------------------------------------- omega, flops, layout


def test_omega_per_expert() -> None:
    sae = scale_sae()
    with torch.no_grad():
        sae.omega.copy_(torch.arange(6.0))
    assert omega_per_expert(sae) == [0, 1, 2, 3, 4, 5]
    assert omega_per_expert(scale_sae(feature_scaling=False)) is None
    assert omega_per_expert(ScaleSAE(ScaleSAEConfig(d_in=12, d_sae=48, k=4))) is None


def test_encoder_flops_per_token_by_hand() -> None:
    moe = expert_layout(scale_sae())
    assert moe == ExpertLayout(48, 6, 3, True)
    # router 12 * 6 + 3 experts * 8 latents * 12
    assert encoder_flops_per_token(moe, 12) == 72 + 288
    dense = expert_layout(
        TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=48, k=4))
    )
    assert dense == ExpertLayout(48, 1, 1, False)
    assert encoder_flops_per_token(dense, 12) == 12 * 48


def test_explained_variance_of_identity_reconstruction_is_one() -> None:
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=4, d_sae=4, k=4))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x = torch.rand(50, 4) + 0.1  # positive, so ReLU keeps everything
    assert explained_variance(sae, x, batch_size=16) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------- everything


def test_compute_sae_metrics_on_a_topk_sae_gets_decoder_geometry_only() -> None:
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=4, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(basis(0, 0, 1, 2))
    metrics = compute_sae_metrics(sae, torch.randn(10, 8))
    assert metrics.expert_load is None and metrics.omega is None
    values = metrics.to_dict()
    assert values["redundancy/0.9"] == 0.5
    assert "redundancy/intra_expert/0.9" not in values
    assert values["encoder_flops_per_token"] == 32
    json.dumps(values)


def test_compute_sae_metrics_on_a_scale_sae_is_json_and_wandb_ready() -> None:
    sae = scale_sae()
    metrics = compute_sae_metrics(sae, torch.randn(100, 12))
    values = json.loads(json.dumps(metrics.to_dict()))
    assert len(values["expert_load/selected_share"]) == 6
    assert values["omega"] == [0.0] * 6
    assert values["network_sparsity"] == 0.5
    assert "redundancy/inter_expert/mean_max_cosine" in values
    flat = metrics.to_log_dict(prefix="moe/")
    assert (
        flat["moe/expert_load/selected_share/5"]
        == values["expert_load/selected_share"][5]
    )
    assert all(isinstance(v, (int, float)) for v in flat.values())


# ----------------------------------------------------------- training logging


def test_routing_metrics_by_hand_and_lazily() -> None:
    routing = Routing(
        probs=torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.25]]),
        experts=torch.tensor([[0], [1], [0], [0]]),
        weights=torch.ones(4, 1),
    )
    metrics = routing_metrics(routing_counts(routing), omega=torch.tensor([0.5, -0.25]))
    assert all(callable(v) for v in metrics.values())
    values = {key: value() for key, value in metrics.items()}
    assert values["moe/expert_selected_share/0"] == 0.75
    assert values["moe/experts_never_selected"] == 0
    assert values["moe/omega/1"] == -0.25
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert values["moe/expert_load_entropy"] == pytest.approx(expected)
    # f = (3/4, 1/4), P = (5/8, 3/8): N * sum f P = 2 * (15/32 + 3/32)
    assert values["moe/load_balance_ratio"] == pytest.approx(18 / 16)


def test_balance_ratio_is_one_when_balanced() -> None:
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0], [1], [2], [3]])
    assert load_balance_ratio(Routing(probs, experts, probs)).item() == pytest.approx(
        1.0
    )


def test_decoder_metrics_evaluator_keeps_the_inner_metrics() -> None:
    sae = scale_sae()
    evaluator = DecoderMetricsEvaluator(lambda *_: {"metrics/ce_loss": 1.0})
    values = evaluator(sae, None, None)
    assert values["metrics/ce_loss"] == 1.0
    assert 0 <= values["moe/redundancy/0.9"] <= 1
    assert "moe/feature_dimensionality/global" in values
    assert "moe/redundancy/inter_expert/0.8" in values


def test_decoder_histograms_for_log_histograms() -> None:
    sae = scale_sae()
    histograms = decoder_histograms(sae)
    assert histograms["weights/W_dec_max_cosine"].shape == (48,)
    assert histograms["weights/omega"].shape == (6,)
    dense = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=48, k=4))
    assert set(decoder_histograms(dense)) == {"weights/W_dec_max_cosine"}


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import wandb

    tmp = tmp_path_factory.mktemp("wandb")
    patch = pytest.MonkeyPatch()
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        patch.setenv(name, str(tmp))
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    logged: list[dict[str, Any]] = []
    real_log = wandb.Run.log  # wandb.init rebinds wandb.log to the run's method

    def spy(run: Any, data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        logged.append(dict(data))
        real_log(run, data, *args, **kwargs)

    patch.setattr(wandb.Run, "log", spy)
    torch.manual_seed(0)
    sae_cfg = ScaleTrainingSAEConfig(
        d_in=TINY_D_MODEL, d_sae=64, n_experts=4, n_active_experts=2, k=4
    )
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny-gpt2",
        hook_name="blocks.1.hook_resid_post",
        dataset_path="local-tokens",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=16,
        training_tokens=128 * 40,
        train_batch_size_tokens=128,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        n_eval_batches=1,
        eval_batch_size_prompts=4,
        device="cpu",
        checkpoint_path=str(tmp / "checkpoints"),
        output_path=str(tmp / "output"),
        logger=LoggingConfig(
            log_to_wandb=True, wandb_log_frequency=10, eval_every_n_wandb_logs=2
        ),
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(
        cfg,
        override_dataset=build_token_dataset(n_rows=256, context_size=16),
        override_model=build_tiny_gpt2(),
        override_sae=ScaleTrainingSAE(sae_cfg),
    )
    add_decoder_metrics_to_evals(runner)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a busy machine
    try:
        sae = runner.run()
    finally:
        torch.set_num_threads(threads)
        patch.undo()
    run_files = list(tmp.glob("wandb/offline-run-*/run-*.wandb"))
    return {"logged": logged, "files": run_files, "runner": runner, "sae": sae}


def test_training_metrics_reach_wandb_offline_on_logging_steps(
    wandb_run: dict[str, Any],
) -> None:
    steps = [d for d in wandb_run["logged"] if "losses/overall_loss" in d]
    assert len(steps) == 4  # 40 steps, logging every 10
    for step in steps:
        assert 0 <= step["metrics/moe/expert_load_entropy"] <= 1
        assert step["metrics/moe/load_balance_ratio"] >= 1 - 1e-6
        assert "metrics/moe/omega/3" in step
        shares = [step[f"metrics/moe/expert_selected_share/{i}"] for i in range(4)]
        assert sum(shares) == pytest.approx(2.0)
        assert "losses/load_balancing_loss" in step
    evals = [d for d in wandb_run["logged"] if "moe/redundancy/0.9" in d]
    assert len(evals) == 2  # every 2 logs
    assert "moe/redundancy/intra_expert/0.8" in evals[0]
    assert "model_performance_preservation" in evals[0]  # SAELens's own evals
    (run_file,) = wandb_run["files"]
    contents = run_file.read_bytes()
    for key in (
        b"metrics/moe/expert_load_entropy",
        b"moe/redundancy/0.9",
        b"metrics/moe/omega/0",
    ):
        assert key in contents


def test_expert_load_from_an_activations_store(wandb_run: dict[str, Any]) -> None:
    store = wandb_run["runner"].activations_store
    load = expert_load(wandb_run["sae"], store, n_batches=2)
    assert load.n_tokens == 2 * 128
    assert sum(load.selected_share) == pytest.approx(2.0)


def test_add_decoder_metrics_to_synthetic_runner_needs_evals() -> None:
    class FakeSyntheticRunner:
        def __init__(self, eval_frequency: int) -> None:
            self.cfg = type("Cfg", (), {"eval_frequency": eval_frequency})()

        def _create_evaluator(self) -> Any:
            return lambda *_: {"synthetic/mcc": 0.5}

    with pytest.raises(ValueError, match="eval_frequency"):
        add_decoder_metrics_to_evals(FakeSyntheticRunner(0))
    runner = FakeSyntheticRunner(10)
    add_decoder_metrics_to_evals(runner)
    values = runner._create_evaluator()(scale_sae(), None, None)
    assert values["synthetic/mcc"] == 0.5
    assert "moe/redundancy/0.7" in values


# ------------------------------------------------------- expert specialisation


def test_feature_trees_labels_every_node_of_each_tree() -> None:
    roots = [
        HierarchyNode(0, [HierarchyNode(1), HierarchyNode(2)]),
        HierarchyNode(3, [HierarchyNode(4, [HierarchyNode(5)])]),
    ]
    assert feature_trees(roots, 7).tolist() == [0, 0, 0, 1, 1, 1, -1]


def test_expert_specialisation_pure_and_mixed_experts_by_hand() -> None:
    gt = torch.eye(8)
    trees = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pure = expert_specialisation(basis(0, 1, 2, 3, 4, 5, 6, 7), 2, gt, trees)
    assert pure.purity == [1.0, 1.0]
    assert pure.overall_purity == 1.0
    assert pure.tree_counts == [{0: 4}, {1: 4}]
    assert pure.chance_purity < 1.0
    # expert 0: trees 0,0,0,1 ; expert 1: trees 1,1,0,1 -> 3/4 each
    mixed = expert_specialisation(basis(0, 1, 2, 4, 5, 6, 3, 7), 2, gt, trees)
    assert mixed.purity == [0.75, 0.75]
    assert mixed.overall_purity == 0.75
    assert mixed.n_matched == 8


def test_expert_specialisation_skips_weak_and_untreed_matches() -> None:
    gt = torch.eye(4)
    trees = torch.tensor([0, 0, 1, -1])
    W_dec = torch.stack(
        [gt[0], gt[1], gt[3], gt[2] + gt[3] * 3]
    )  # last: cos 0.32 to f2
    result = expert_specialisation(W_dec, 2, gt, trees, min_cosine=0.5)
    assert result.n_matched == 2
    assert result.purity == [1.0, None]
    json.dumps(result.to_dict())


def test_highpass_decoder_subtracts_each_experts_mean_row_by_hand() -> None:
    W_dec = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [0.0, 3.0]])
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, -1.0], [0.0, 1.0]])
    torch.testing.assert_close(highpass_decoder(W_dec, 2), expected)
    torch.testing.assert_close(highpass_decoder(W_dec, 1), W_dec - W_dec.mean(0))


def test_highpass_redundancy_ignores_a_shared_expert_direction() -> None:
    """Rows that agree only through their expert's common component are not duplicates."""
    torch.manual_seed(0)
    common = torch.randn(1, 64) * 10
    W_dec = common + torch.randn(16, 64)  # one expert, rows close to `common`
    raw = decoder_redundancy(W_dec).overall.fraction_above[0.9]
    highpass = decoder_redundancy(highpass_decoder(W_dec, 1)).overall
    assert raw == 1.0
    assert highpass.fraction_above[0.8] == 0.0


def test_live_redundancy_ignores_duplicates_of_dead_latents() -> None:
    """Latent 1 duplicates 0 but is dead; 3 duplicates 2 in the other expert, both live."""
    W_dec = basis(0, 0, 1, 1, 2, 3)
    live = torch.tensor([True, False, True, True, True, True])
    redundancy = decoder_redundancy(W_dec, n_experts=2, thresholds=(0.9,), live=live)
    assert redundancy.overall.fraction_above[0.9] == pytest.approx(2 / 5)
    assert redundancy.intra_expert is not None and redundancy.inter_expert is not None
    # expert 0 = {0, 1, 2}: 0's only copy is dead; expert 1 = {3, 4, 5}
    assert redundancy.intra_expert.fraction_above[0.9] == 0.0
    assert redundancy.inter_expert.fraction_above[0.9] == pytest.approx(2 / 5)
    everyone = decoder_redundancy(W_dec, n_experts=2, thresholds=(0.9,))
    assert everyone.overall.fraction_above[0.9] == pytest.approx(4 / 6)


def test_max_cosines_with_no_live_partner_is_minus_infinity() -> None:
    live = torch.tensor([True, False, False, True])
    cosines = max_cosines(basis(0, 0, 1, 1), n_experts=2, live=live)
    assert cosines.intra_expert is not None
    # the live latents' only expert-mates are dead; the dead ones see a live copy
    assert cosines.intra_expert.tolist() == [float("-inf"), 1.0, 1.0, float("-inf")]
    scope = redundancy_scope(torch.tensor([0.95, float("-inf"), 0.5]), (0.9,))
    assert scope.fraction_above == {0.9: pytest.approx(1 / 3)}
    assert scope.mean_max_cosine == pytest.approx(0.725)


def test_expert_domain_counts_spread_each_token_over_its_pairs() -> None:
    experts = torch.tensor([[0, 1], [2, 0]])
    domains = torch.tensor([[True, False, True], [False, True, False]])
    counts = expert_domain_counts(experts, domains, n_experts=3)
    expected = torch.tensor(
        [[0.25, 0.5, 0.25], [0.25, 0.0, 0.25], [0.0, 0.5, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(counts, expected)


def one_hot_domains(domain: torch.Tensor, n_domains: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(domain, n_domains).bool()


def test_routing_specialisation_of_a_one_to_one_router_is_one() -> None:
    domain = torch.randint(4, (4_000,))
    result = routing_specialisation(domain[:, None], one_hot_domains(domain, 4), 4)
    assert result.nmi == pytest.approx(1.0)
    assert result.purity == pytest.approx([1.0] * 4)
    assert result.domains_served == pytest.approx([1.0] * 4)
    assert result.overall_purity == pytest.approx(1.0)
    assert result.chance_nmi < 0.01
    assert result.chance_overall_purity == pytest.approx(0.25, abs=0.02)
    assert result.chance_mean_domains_served == pytest.approx(4.0, abs=0.02)
    json.dumps(result.to_dict())


def test_routing_specialisation_of_a_router_blind_to_domains_is_at_chance() -> None:
    domain = torch.randint(8, (20_000,))
    experts = torch.stack([torch.randperm(4)[:2] for _ in range(20_000)])
    result = routing_specialisation(experts, one_hot_domains(domain, 8), 4)
    assert result.nmi < 0.005
    assert result.nmi == pytest.approx(result.chance_nmi, abs=0.002)
    assert result.overall_purity == pytest.approx(
        result.chance_overall_purity, abs=0.01
    )
    assert result.expert_share == pytest.approx([0.25] * 4, abs=0.01)
    for served, chance in zip(
        result.domains_served, result.chance_domains_served, strict=True
    ):
        assert served == pytest.approx(chance, abs=0.05)


def test_routing_specialisation_shuffled_labels_put_purity_at_chance() -> None:
    """A router that follows the domains, scored against the wrong tokens' labels."""
    domain = torch.randint(4, (10_000,))
    experts = domain[:, None] // 2  # two domains per expert: purity 1/2
    true = routing_specialisation(experts, one_hot_domains(domain, 4), 2)
    assert true.overall_purity == pytest.approx(0.5, abs=0.02)
    assert true.domains_served == pytest.approx([2.0, 2.0], abs=0.01)
    assert true.chance_overall_purity == pytest.approx(0.25, abs=0.02)
    shuffled = one_hot_domains(domain[torch.randperm(10_000)], 4)
    blind = routing_specialisation(experts, shuffled, 2)
    assert blind.overall_purity == pytest.approx(blind.chance_overall_purity, abs=0.02)
    assert blind.nmi == pytest.approx(blind.chance_nmi, abs=0.002)


def test_routing_specialisation_leaves_unused_experts_out() -> None:
    domain = torch.randint(2, (100,))
    result = routing_specialisation(domain[:, None], one_hot_domains(domain, 2), 3)
    assert result.purity[2] is None and result.domains_served[2] is None
    assert result.chance_purity[2] is None
    assert result.expert_share[2] == 0.0


def test_routing_specialisation_refuses_mismatched_tokens() -> None:
    with pytest.raises(ValueError, match="one row per token"):
        routing_specialisation(torch.zeros(3, 1), torch.ones(4, 2, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="n_shuffles"):
        routing_specialisation(
            torch.zeros(3, 1), torch.ones(3, 2, dtype=torch.bool), 2, n_shuffles=0
        )
