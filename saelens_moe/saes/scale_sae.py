"""Scale SAE: a Mixture-of-Experts SAE with Multiple Expert Activation and Feature Scaling.

"Beyond Redundancy: Diverse and Specialized Multi-Expert Sparse Autoencoder",
arXiv 2511.05745. For a token x (after SAELens's `process_sae_in`, x - b_dec):

1. p = softmax(x W_router + b_router); the router selects the e most probable experts S.
2. w_i = softmax over the selected p_i (or another `expert_weighting`), for i in S.
3. W^_i = (1 + omega_i) W_i - omega_i T mu_i: Feature Scaling of expert i's encoder
   around its mean row mu_i (training only; folded into W_enc on export).
4. f_i = w_i ReLU(||W_dec|| (W^_i x + b_enc,i)) for the m latents of each i in S.
5. The K largest f over all selected experts are kept; x_hat = sum_j f_j W_dec[j] /
   ||W_dec[j]|| + b_dec. Training adds alpha d_in N sum_i f_i P_i, the load balance.

`saelens_moe.saes.moe.dense_forward` is the same in about thirty lines, every expert
computed and masked: the oracle the classes here are tested against. The classes
compute only the selected experts, through `COMPUTE`: `saelens_moe.saes.fast`, or
`saelens_moe.saes.moe`'s plain versions of the same four functions (one import line).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import _fold_norm_topk, act_times_W_dec
from torch import nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from saelens_moe.checks import (
    check_state_dict,
    count_dead_if_loss_finite,
    validate_expert_fields,
    validate_training_fields,
)
from saelens_moe.router_health import step_metrics
from saelens_moe.saes import fast as COMPUTE  # `moe as COMPUTE`: no saes/fast needed
from saelens_moe.saes.moe import (
    Decoder,
    ExpertWeighting,
    FeatureScaling,
    Routing,
    SparseCode,
    candidate_pre,
    feature_scaling_anchors,
    fold_feature_scaling,
    load_balancing_loss,
    route,
    routing_counts,
)
from saelens_moe.saes.parallel import (
    ExpertExchange,
    Parallel,
    decode_at_owners,
    expert_slice,
)
from saelens_moe.saes.router_init import RouterInit, kmeans_router
from saelens_moe.saes.sparse_gradients import SparseExpertGradients
from saelens_moe.saes.sparse_latents import (
    candidate_latents,
    scatter_to_dense,
    to_block_sparse,
    to_sparse_coo,
)

PAPER_URL = "https://arxiv.org/abs/2511.05745"
DEFAULT_DEAD_LATENT_WINDOW = 100
"""Steps without firing after which AuxK trains a latent (benchmarks/README.md)."""


class ExpertEncoding(NamedTuple):
    """Everything the routed encoder computed for one batch of tokens."""

    routing: Routing
    candidate_pre: torch.Tensor
    """Pre-activations of the selected experts' latents, slot-major. [tokens, e * m]"""
    code: SparseCode
    decoder: Decoder
    """The decoder (and its row norms) the encoding was made against; under expert
    parallelism this process's rows only."""
    exchange: ExpertExchange | None
    """How pairs travel to the experts' processes, under expert parallelism."""


@dataclass
class ScaleSAEConfig(SAEConfig):
    """Configuration of an inference Scale SAE (arXiv 2511.05745).

    Args:
        k (int): Latents kept per token, chosen globally over the selected experts'
            latents.
        n_experts (int): Number of experts N; expert i owns latents
            [i * d_sae / N, (i + 1) * d_sae / N).
        n_active_experts (int): Experts the router selects per token ("Multiple
            Expert Activation", e in the paper).
        expert_weighting (str): How a selected expert's activations are weighted:
            "softmax_of_probs" (softmax over the selected router probabilities, the
            authors' default), "renormalized" (probabilities divided by their sum),
            "probs" (the raw probability, the Switch SAE rule) or "uniform" (1).
        rescale_acts_by_decoder_norm (bool): Multiply pre-activations by the decoder
            row norms and divide them out when decoding, as SAELens TopK does.
        d_in (int): Input width. Inherited from SAEConfig.
        d_sae (int): Total dictionary width over all experts. Inherited from SAEConfig.
        dtype (str): Parameter dtype. Inherited from SAEConfig.
        device (str): Parameter device. Inherited from SAEConfig.
        apply_b_dec_to_input (bool): Subtract b_dec from the input before routing and
            encoding. Inherited from SAEConfig.
        normalize_activations (str): Input normalisation. Inherited from SAEConfig.
        reshape_activations (str): "none" or "hook_z". Inherited from SAEConfig.
        metadata (SAEMetadata): Model, hook and training metadata. Inherited from
            SAEConfig.
    """

    k: int = 100
    n_experts: int = 8
    n_active_experts: int = 2
    expert_weighting: ExpertWeighting = "softmax_of_probs"
    rescale_acts_by_decoder_norm: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scale"

    @override
    def __post_init__(self) -> None:
        validate_expert_fields(self)
        super().__post_init__()


class ScaleSAE(SAE[ScaleSAEConfig]):
    """Inference Scale SAE: router, selected experts' encoders, global Top-K, decoder."""

    b_enc: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter
    parallel: Parallel | None = None
    """Set by `saelens_moe.sharded.load_own_experts` when each process holds a share
    of the experts; None in one process."""
    sparse_gradients: SparseExpertGradients | None = None
    """Always None here: inference SAEs are not trained."""

    init_seed: int = 0
    """The seed every expert's initial weights derive from (`init_own_weights`)."""

    @override
    def initialize_weights(self) -> None:
        self.init_seed = draw_init_seed()
        self.init_own_weights(self.init_seed)

    def init_own_weights(self, seed: int) -> None:
        """Initialise the experts this process holds, from `seed` alone (no d_sae tensor)."""
        _init_expert_weights(self, seed, decoder_init_norm=None)

    def feature_scaling_state(self) -> FeatureScaling | None:
        """None: Feature Scaling is folded into W_enc on export."""
        return None

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        encoding, leading = _routed_encoding(self, x, scaling=None)
        return _dense_feature_acts(self, encoding.code, leading)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """The k kept latents of each token as (values, latents), each [..., k].

        The fast form of `encode`: nothing of size d_sae is built and no
        `hook_sae_acts_post` hook runs. `scatter_to_dense` turns it into `encode`'s output.
        """
        return _sparse_code(self, x, scaling=None)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return _decode_dense(self, feature_acts)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_dense_path(self):
            return super().forward(x)
        return _forward_sparse(self, x, scaling=None)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        _require_decoder_norm_rescaling(self)
        super().fold_W_dec_norm()

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.W_router.data *= scaling_factor

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        _fold_whitening(self, mean, whitening_matrix, unwhitening_matrix)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        _fold_checkpoint_feature_scaling(self, state_dict)
        check_state_dict(self.state_dict(), state_dict)


@dataclass
class ScaleTrainingSAEConfig(TrainingSAEConfig):
    """Configuration for training a Scale SAE (arXiv 2511.05745).

    Args:
        k (int): Latents kept per token, chosen globally over the selected experts'
            latents.
        n_experts (int): Number of experts N; expert i owns latents
            [i * d_sae / N, (i + 1) * d_sae / N).
        n_active_experts (int): Experts the router selects per token ("Multiple
            Expert Activation", e in the paper).
        expert_weighting (str): How a selected expert's activations are weighted:
            "softmax_of_probs" (the authors' default), "renormalized", "probs" (the
            Switch SAE rule) or "uniform"; benchmarks/README.md compares them.
        feature_scaling (bool): Re-weight each expert's encoder rows around their mean
            direction, W^_i = (1 + omega_i) W_i - omega_i a_i, with one learned omega
            per expert (initialised to 0, i.e. no scaling).
        learn_lowpass (bool): Learn the shared low-pass map T (initialised to the
            identity) that turns an expert's mean direction mu_i into a_i = T mu_i;
            otherwise a_i = mu_i. Only used with feature_scaling.
        load_balancing_coefficient (float): alpha in the load-balancing loss
            alpha * d_in * N * sum_i f_i P_i (the authors use 3). Its weight against
            the MSE scales as alpha * d_in / E||x||^2, so the best value depends on
            the activation scale (benchmarks/README.md); 0 lets the experts
            unbalance. Its floor is alpha * d_in, not 0: a perfectly balanced
            router logs load_balancing_loss = alpha * d_in, and the metric
            moe/load_balance_ratio (N * sum_i f_i P_i) reads 1.0 there and N when
            one expert takes every token.
        load_balancing_warm_up_steps (int): Steps over which SAELens ramps the
            load-balancing coefficient up from 0.
        router_init (str): How the router starts: "kmeans" (the default) sets
            each expert's router column to a spherical k-means centroid of the
            first training batch (over every process's tokens), "random" keeps
            nn.Linear's initialisation. A router loaded from a checkpoint or
            pretrained SAE is never replaced; one set by hand is, unless
            router_init is "random". On the domain ground truth k-means raised
            the routing's mutual information with the domains 2-3x, and explained
            variance at 1M tokens on clustered and independent data alike
            (0.002-0.004 lower at 4M; benchmarks/README.md).
        aux_loss_coefficient (float): Weight of SAELens's AuxK loss, in which the
            computed dead latents reconstruct the residual. The authors do not use
            it; it is on by default because on the synthetic benchmark turning it
            off left 121 instead of 6 of 256 latents dead and lowered explained
            variance by 0.04 (benchmarks/README.md). It trains dead latents on the
            expert-weighted pre-activations, the scale at which they compete.
        dead_latent_window (int | None): Steps a latent may go without firing before
            AuxK counts it as dead, tracked by the SAE from its first step; AuxK also
            counts the latents the trainer's dead_neuron_mask marks (SAELens's
            dead_feature_window, 1000 steps by default). None: the trainer's mask only.
        rescale_acts_by_decoder_norm (bool): Treat decoder rows as unit directions:
            pre-activations are multiplied by the row norms before ReLU, weighting
            and Top-K, and divided out when decoding (SAELens TopK's convention).
        decoder_init_norm (float | None): Initial decoder row norm (W_enc starts as
            W_dec.T). 1.0 here, against SAELens's 0.1: on the realistic synthetic
            benchmark it raised explained variance by 0.06-0.12 and left 0-78 instead
            of 207-1028 of 1536 latents dead (benchmarks/README.md).
        d_in (int): Input width. Inherited from SAEConfig.
        d_sae (int): Total dictionary width over all experts. Inherited from SAEConfig.
        dtype (str): Parameter dtype. Inherited from SAEConfig.
        device (str): Parameter device. Inherited from SAEConfig.
        apply_b_dec_to_input (bool): Subtract b_dec from the input before routing and
            encoding. Inherited from SAEConfig.
        normalize_activations (str): Input normalisation. Inherited from SAEConfig.
        reshape_activations (str): "none" or "hook_z". Inherited from SAEConfig.
        metadata (SAEMetadata): Model, hook and training metadata. Inherited from
            SAEConfig.
    """

    k: int = 100
    n_experts: int = 8
    n_active_experts: int = 2
    expert_weighting: ExpertWeighting = "softmax_of_probs"
    feature_scaling: bool = True
    learn_lowpass: bool = True
    load_balancing_coefficient: float = 3.0
    load_balancing_warm_up_steps: int = 0
    router_init: RouterInit = "kmeans"
    aux_loss_coefficient: float = 1.0
    dead_latent_window: int | None = DEFAULT_DEAD_LATENT_WINDOW
    decoder_init_norm: float | None = 1.0
    rescale_acts_by_decoder_norm: bool = True

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scale"

    @override
    def __post_init__(self) -> None:
        validate_expert_fields(self)
        validate_training_fields(self)
        super().__post_init__()


class ScaleTrainingSAE(TrainingSAE[ScaleTrainingSAEConfig]):
    """Trainable Scale SAE. Computes only the routed experts in forward and backward."""

    b_enc: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter
    omega: nn.Parameter
    W_lowpass: nn.Parameter
    parallel: Parallel | None = None
    """Set by `saelens_moe.distributed` when several processes train this SAE."""
    sparse_gradients: SparseExpertGradients | None = None
    """Set by `saelens_moe.lazy_adam.LazyAdam`: W_enc's, W_dec's and b_enc's
    gradients then arrive there as rows of the latents each step touched."""
    steps_since_fired: torch.Tensor | None = None
    """Training steps since each latent last fired, when `dead_latent_window` is set;
    made at the first step. Multi-process checkpoints (`saelens_moe.distributed`)
    save it; a one-process SAELens resume counts afresh. [d_sae]"""

    init_seed: int = 0
    """The seed every expert's initial weights derive from (`init_own_weights`)."""
    router_init_pending: bool = False
    """The router waits for the first training batch (`router_init="kmeans"`);
    cleared by that batch and by loading any weights."""

    @override
    def initialize_weights(self) -> None:
        self.init_seed = draw_init_seed()
        self.init_own_weights(self.init_seed)
        self.router_init_pending = self.cfg.router_init == "kmeans"
        self.register_load_state_dict_post_hook(_router_was_loaded)

    def init_own_weights(self, seed: int) -> None:
        """Initialise the experts this process holds, from `seed` alone.

        Expert i's weights depend only on (seed, i), so a run whose processes each
        hold a share starts from the same weights as one process, and no process
        ever builds a tensor of the whole dictionary.
        """
        _init_expert_weights(self, seed, self.cfg.decoder_init_norm)
        if self.cfg.feature_scaling:
            n_own = len(own_experts(self))
            self.omega = nn.Parameter(
                torch.zeros(n_own, dtype=self.dtype, device=self.device)
            )
            if self.cfg.learn_lowpass:
                self.W_lowpass = nn.Parameter(
                    torch.eye(self.cfg.d_in, dtype=self.dtype, device=self.device)
                )

    def feature_scaling_state(self) -> FeatureScaling | None:
        """omega and the low-pass map T, or None without Feature Scaling."""
        if not self.cfg.feature_scaling:
            return None
        W_lowpass = self.W_lowpass if self.cfg.learn_lowpass else None
        return FeatureScaling(self.omega, W_lowpass)

    @override
    def encode_with_hidden_pre(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoding, leading = _routed_encoding(self, x, self.feature_scaling_state())
        return (
            _dense_feature_acts(self, encoding.code, leading),
            _dense_hidden_pre(self, encoding, leading),
        )

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        encoding, leading = _routed_encoding(self, x, self.feature_scaling_state())
        return _dense_feature_acts(self, encoding.code, leading)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """The k kept latents of each token as (values, latents), each [..., k]."""
        return _sparse_code(self, x, self.feature_scaling_state())

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return _decode_dense(self, feature_acts)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_dense_path(self):
            return super().forward(x)
        return _forward_sparse(self, x, self.feature_scaling_state())

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        if self.router_init_pending:
            self.start_router_from(sae_in)
        encoding, leading = _routed_encoding(self, sae_in, self.feature_scaling_state())
        hooked_acts = None
        if _has_hooks(self.hook_sae_acts_post):  # dense, as SAELens's TopK gives
            hooked_acts = _dense_feature_acts(self, encoding.code, leading)
            sae_out = _decode_dense(self, hooked_acts)
        else:
            sae_out = _finish_decode(self, _decode_code(self, encoding, encoding.code))
        step = step_input.n_training_steps
        counts = self._routing_counts(encoding.routing)
        losses = {
            "mse_loss": self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean(),
            "load_balancing_loss": self._load_balancing_loss(
                step_input, encoding, counts
            ),
        }
        # AuxK is computed after the check, from the same finite weights and inputs
        n_dead = count_dead_if_loss_finite(
            losses, sae_in, step, self._dead_latents(step_input), self.parallel
        )
        losses["auxiliary_reconstruction_loss"] = self._dead_latent_loss(
            step_input, encoding, sae_out, n_dead
        )
        self._count_steps_since_fired(encoding.code)
        # torch.compiler.disable's typing loses the signature
        return _step_output(
            self,
            step_input,  # pyright: ignore[reportCallIssue]
            encoding,
            sae_out,
            losses,
            hooked_acts,
            counts,
        )

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        encoding, _ = _routed_encoding(
            self, step_input.sae_in, self.feature_scaling_state()
        )
        dead = self._dead_latents(step_input)
        n_dead = 0 if dead is None else int(dead.sum())
        counts = self._routing_counts(encoding.routing)
        return {
            "load_balancing_loss": self._load_balancing_loss(
                step_input, encoding, counts
            ),
            "auxiliary_reconstruction_loss": self._dead_latent_loss(
                step_input, encoding, sae_out, n_dead
            ),
        }

    @torch.no_grad()
    def start_router_from(self, sae_in: torch.Tensor) -> None:
        """Point the router at k-means centroids of this batch's router inputs."""
        router_in = self.process_sae_in(sae_in).reshape(-1, self.cfg.d_in)
        W_router, b_router = kmeans_router(router_in, self.cfg.n_experts, self.parallel)
        self.W_router.copy_(W_router)
        self.b_router.copy_(b_router)
        self.router_init_pending = False

    def _routing_counts(self, routing: Routing) -> torch.Tensor:
        """The batch's `routing_counts`, over every process's tokens. [3, n_experts]"""
        counts = routing_counts(routing)
        return counts if self.parallel is None else self.parallel.sum(counts)

    def _load_balancing_loss(
        self, step_input: TrainStepInput, encoding: ExpertEncoding, counts: torch.Tensor
    ) -> torch.Tensor:
        balance = load_balancing_loss(encoding.routing, self.cfg.d_in, counts)
        return step_input.coefficients["load_balancing"] * balance

    def _dead_latents(self, step_input: TrainStepInput) -> torch.Tensor | None:
        """The dead-latent mask when AuxK is on: the trainer's, or ours. [d_sae] bool"""
        if self.cfg.aux_loss_coefficient == 0:
            return None
        dead = step_input.dead_neuron_mask
        window, steps = self.cfg.dead_latent_window, self.steps_since_fired
        if window is None or steps is None:
            return dead
        ours = steps >= window
        return ours if dead is None else ours | dead.to(ours.device)

    @torch.no_grad()
    def _latents_fired(self, code: SparseCode) -> torch.Tensor:
        """Which latents were kept with a positive activation in this batch. [d_sae] bool

        With several processes, a latent fired if it fired on any of them.
        """
        fired = code.values.new_zeros(self.cfg.d_sae)
        positive = (code.values > 0).flatten().to(fired.dtype)
        fired.index_add_(0, code.latents.flatten(), positive)
        return (fired if self.parallel is None else self.parallel.sum(fired)) > 0

    @torch.no_grad()
    def _count_steps_since_fired(self, code: SparseCode) -> None:
        """Advance `steps_since_fired` by one step and zero it for latents that fired."""
        if self.cfg.dead_latent_window is None:
            return
        fired = self._latents_fired(code)
        steps = self.steps_since_fired
        if steps is None:
            steps = torch.zeros_like(fired, dtype=torch.long)
        self.steps_since_fired = torch.where(fired, 0, steps + 1)

    def _dead_latent_loss(
        self,
        step_input: TrainStepInput,
        encoding: ExpertEncoding,
        sae_out: torch.Tensor,
        n_dead: int,
    ) -> torch.Tensor:
        """SAELens's AuxK loss, drawing only on latents of the selected experts."""
        dead = self._dead_latents(step_input)
        if dead is None or n_dead == 0:
            return sae_out.new_zeros(())
        k_aux = self.cfg.d_in // 2
        scale = min(n_dead / k_aux, 1.0)
        # picks beyond the computed dead latents come back as zeros, so k_aux need
        # not shrink to n_dead as in SAELens (and stays fixed under torch.compile)
        # dead latents learn at the scale they would compete at: weighted, like the
        # candidates of the main Top-K (the router's weights are not trained here)
        routing = encoding.routing
        weights = routing.weights.detach().repeat_interleave(
            encoding.candidate_pre.shape[1] // routing.weights.shape[1], dim=1
        )
        code = _dead_latent_code(
            encoding.candidate_pre * weights, routing.experts, dead, k_aux
        )
        recons = _decode_code(self, encoding, code)
        residual = (step_input.sae_in - sae_out).detach()
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * loss

    @override
    def get_coefficients(self) -> dict[str, TrainCoefficientConfig | float]:
        return {
            "load_balancing": TrainCoefficientConfig(
                value=self.cfg.load_balancing_coefficient,
                warm_up_steps=self.cfg.load_balancing_warm_up_steps,
            )
        }

    @torch.no_grad()
    def fold_feature_scaling(self) -> None:
        """Write W^_i into W_enc and set omega to 0; outputs are unchanged."""
        scaling = self.feature_scaling_state()
        if scaling is None:
            return
        self.W_enc.data.copy_(
            fold_feature_scaling(self.W_enc, scaling, _n_local_experts(self))
        )
        self.omega.data.zero_()

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        _require_decoder_norm_rescaling(self)
        self.fold_feature_scaling()
        super().fold_W_dec_norm()

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        self.fold_feature_scaling()
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.W_router.data *= scaling_factor

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        self.fold_feature_scaling()
        _fold_whitening(self, mean, whitening_matrix, unwhitening_matrix)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        check_state_dict(self.state_dict(), state_dict)

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        _make_contiguous(state_dict)

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        scaling = self.feature_scaling_state()
        if scaling is not None:
            with torch.no_grad():
                state_dict["W_enc"] = fold_feature_scaling(
                    self.W_enc, scaling, self.cfg.n_experts
                )
            state_dict.pop("omega")
            state_dict.pop("W_lowpass", None)
        if self.cfg.rescale_acts_by_decoder_norm:
            _fold_norm_topk(
                W_dec_norm=self.get_W_dec_norm(),
                W_enc=state_dict["W_enc"],
                b_enc=state_dict["b_enc"],
                W_dec=state_dict["W_dec"],
            )
        _make_contiguous(state_dict)


AnyScaleSAE = ScaleSAE | ScaleTrainingSAE


@torch.compiler.disable  # sparse tensors and Python-side metrics: eager only
def _step_output(
    sae: "ScaleTrainingSAE",
    step_input: TrainStepInput,
    encoding: ExpertEncoding,
    sae_out: torch.Tensor,
    losses: dict[str, torch.Tensor],
    hooked_acts: torch.Tensor | None,  # [tokens, d_sae], as a hook left them
    counts: torch.Tensor,  # [3, n_experts], `routing_counts` over all processes
) -> TrainStepOutput:
    """SAELens's step output: sparse latents, summed loss, routing metrics."""
    code, d_sae = encoding.code, sae.cfg.d_sae
    feature_acts = to_sparse_coo(code.values.detach(), code.latents, d_sae)
    if hooked_acts is not None:
        feature_acts = hooked_acts.detach().to_sparse()
    return TrainStepOutput(
        sae_in=step_input.sae_in,
        sae_out=sae_out,
        feature_acts=feature_acts,
        hidden_pre=to_block_sparse(
            encoding.candidate_pre.detach(), encoding.routing.experts, d_sae
        ),
        loss=sum(losses.values(), torch.zeros((), device=sae_out.device)),
        losses=losses,
        metrics=step_metrics(
            sae,
            counts,
            sae.omega
            if sae.cfg.feature_scaling and _n_local_experts(sae) == sae.cfg.n_experts
            else None,
            step_input.n_training_steps,
        ),
    )


def _router_was_loaded(module: nn.Module, _: object) -> None:
    """load_state_dict's post-hook: a loaded router is kept."""
    if isinstance(module, ScaleTrainingSAE):
        module.router_init_pending = False


def draw_init_seed() -> int:
    """A seed for `init_own_weights`, from torch's global generator (so `torch.manual_seed` fixes it)."""
    return int(torch.randint(2**62, (), dtype=torch.long))


def own_experts(sae: AnyScaleSAE) -> range:
    """The experts whose weights this process holds: all, or its expert-parallel share."""
    n_experts = sae.cfg.n_experts
    parallel = sae.parallel
    if parallel is None or not parallel.expert_parallel:
        return range(n_experts)
    share = expert_slice(parallel, n_experts, 1)
    return range(share.start, share.stop)


def _init_expert_weights(
    sae: AnyScaleSAE, seed: int, decoder_init_norm: float | None
) -> None:
    """SAELens's initialisation, expert by expert, for the experts this process holds.

    W_dec rows uniform in +-1/sqrt(d_in) (SAELens's kaiming_uniform_), rescaled to
    `decoder_init_norm`; W_enc = W_dec.T; b_enc, b_dec, b_router zero; W_router as
    nn.Linear's default. Expert i draws from a generator seeded with (seed, i), the
    router from (seed, router).
    """
    cfg, dtype, device = sae.cfg, sae.dtype, sae.device
    experts = own_experts(sae)
    block_size = cfg.d_sae // cfg.n_experts
    n_own = len(experts) * block_size
    bound = cfg.d_in**-0.5
    if device.type == "meta":  # loading assigns the weights; nothing to draw
        W_dec = torch.empty(n_own, cfg.d_in, dtype=dtype, device=device)
        W_router = torch.empty(cfg.d_in, cfg.n_experts, dtype=dtype, device=device)
    else:
        rows = [
            _uniform((block_size, cfg.d_in), bound, seed, 1 + expert, device)
            for expert in experts
        ]
        W_dec = torch.cat(rows)
        if decoder_init_norm is not None:
            W_dec *= decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
        W_dec = W_dec.to(dtype)
        W_router = _uniform((cfg.d_in, cfg.n_experts), bound, seed, 0, device)
        W_router = W_router.to(dtype)
    sae.W_dec = nn.Parameter(W_dec)
    sae.W_enc = nn.Parameter(W_dec.T.contiguous())  # one copy of this share
    sae.b_enc = nn.Parameter(torch.zeros(n_own, dtype=dtype, device=device))
    sae.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
    sae.W_router = nn.Parameter(W_router)
    sae.b_router = nn.Parameter(torch.zeros(cfg.n_experts, dtype=dtype, device=device))


def _uniform(
    shape: tuple[int, int], bound: float, seed: int, stream: int, device: torch.device
) -> torch.Tensor:
    """Uniform in +-bound (float32), from a generator seeded with (seed, stream)."""
    generator = torch.Generator(device=device).manual_seed((seed + stream) % 2**63)
    drawn = torch.rand(shape, generator=generator, device=device)
    return drawn.mul_(2 * bound).sub_(bound)


def _routed_encoding(
    sae: AnyScaleSAE, x: torch.Tensor, scaling: FeatureScaling | None
) -> tuple[ExpertEncoding, torch.Size]:
    """Steps 1-5 on the selected experts only: the differentiable encoder.

    Also returns x's leading shape, to restore on outputs (which are 2-D here).
    """
    cfg = sae.cfg
    sae_in = sae.process_sae_in(x)
    flat_in = sae_in.reshape(-1, cfg.d_in)  # [tokens, d_in]
    routing = route(
        flat_in, sae.W_router, sae.b_router, cfg.n_active_experts, cfg.expert_weighting
    )
    experts = routing.experts  # [tokens, e]
    decoder = COMPUTE.decoder_for(
        sae.W_dec, cfg.rescale_acts_by_decoder_norm, sae.sparse_gradients
    )
    exchange = _plan_exchange(sae, experts)
    if exchange is None:
        pre, norms = _selected_expert_pre(
            sae, flat_in, experts, scaling, decoder, cfg.n_experts
        )
        if _has_hooks(sae.hook_sae_acts_pre):  # before the norms, as SAELens's TopK
            pre = _through_dense_hook(sae, pre, experts, sae_in.shape[:-1])
        pre = _times_norms(pre, norms)
    else:

        def owner_pre(inputs: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
            return _times_norms(
                *_selected_expert_pre(
                    sae, inputs, local, scaling, decoder, _n_local_experts(sae)
                )
            )

        pre = exchange.pre_activations(flat_in, cfg.n_active_experts, owner_pre)
    code = COMPUTE.keep_top_k(pre, routing.weights, experts, cfg.k)
    encoding = ExpertEncoding(routing, pre.flatten(1), code, decoder, exchange)
    return encoding, sae_in.shape[:-1]


def _selected_expert_pre(
    sae: AnyScaleSAE,
    flat_in: torch.Tensor,  # [tokens, d_in]
    experts: torch.Tensor,  # [tokens, e], among the n_experts this process holds
    scaling: FeatureScaling | None,
    decoder: Decoder,
    n_experts: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 3-4: the selected experts' pre-activations [tokens, e, m] and row norms."""
    gradients = sae.sparse_gradients
    raw = COMPUTE.selected_expert_matmuls(
        flat_in, experts, sae.W_enc, n_experts, gradients
    )
    omega = anchor_dot = None
    if scaling is not None:
        omega = _per_selected_expert(scaling.omega, experts)  # [tokens, e]
        W_enc, sums = sae.W_enc, None
        if gradients is not None:
            # the sparse step drops the gradient through each expert's mean column
            # mu_i, which would reach every latent of the expert (benchmarks/README.md)
            W_enc = W_enc.detach()
            sums = gradients.summaries.block_sums(W_enc, n_experts)
        anchors = feature_scaling_anchors(W_enc, scaling, n_experts, sums)
        anchor_dot = (flat_in @ anchors).gather(1, experts)  # [tokens, e]
    norms = None
    if decoder.norms is not None:
        norms = _per_selected_expert(decoder.norms.view(n_experts, -1), experts)
    bias = _per_selected_expert(sae.b_enc.view(n_experts, -1), experts)
    return candidate_pre(raw, omega, anchor_dot, bias), norms


def _times_norms(pre: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    return pre if norms is None else pre * norms


def _n_local_experts(sae: AnyScaleSAE) -> int:
    """Experts whose weights this process holds."""
    n_experts = sae.cfg.n_experts
    return (
        n_experts if sae.parallel is None else sae.parallel.experts_per_rank(n_experts)
    )


def _plan_exchange(sae: AnyScaleSAE, experts: torch.Tensor) -> ExpertExchange | None:
    """Under expert parallelism, where this batch's (token, expert) pairs go."""
    parallel = sae.parallel
    if parallel is None or not parallel.expert_parallel:
        return None
    if _has_hooks(sae.hook_sae_acts_pre) or _has_hooks(sae.hook_sae_acts_post):
        raise NotImplementedError(
            "hooks on the latents need the whole dictionary in one process; "
            "train without expert_parallel to use hook_sae_acts_pre/post"
        )
    return ExpertExchange.plan(experts, sae.cfg.n_experts, parallel)


def _decode_code(
    sae: AnyScaleSAE, encoding: ExpertEncoding, code: SparseCode
) -> torch.Tensor:
    """sum_j f_j W_dec[j] (/ ||W_dec[j]||) over `code`'s latents, without b_dec."""
    if encoding.exchange is None:
        return COMPUTE.decode_sparse(code, encoding.decoder)
    block_size = sae.cfg.d_sae // sae.cfg.n_experts
    return encoding.exchange.decode(
        code,
        encoding.routing.experts,
        block_size,
        lambda own: COMPUTE.decode_sparse(own, encoding.decoder),
    )


def _sparse_code(
    sae: AnyScaleSAE, x: torch.Tensor, scaling: FeatureScaling | None
) -> SparseCode:
    """The kept latents of x for inference, each [..., k]."""
    encoding, leading = _routed_encoding(sae, x, scaling)
    values, latents = encoding.code
    k = values.shape[-1]
    return SparseCode(values.view(*leading, k), latents.view(*leading, k))


def _per_selected_expert(
    per_expert: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """The rows of `per_expert` [n_experts, ...] of each selected expert. [tokens, e, ...]

    As an index_select, whose backward is an index_add, several times faster than
    advanced indexing's accumulating index_put.
    """
    picked = per_expert.index_select(0, experts.reshape(-1))
    return picked.view(*experts.shape, *per_expert.shape[1:])


def _through_dense_hook(
    sae: AnyScaleSAE, pre: torch.Tensor, experts: torch.Tensor, leading: torch.Size
) -> torch.Tensor:
    """Show `hook_sae_acts_pre` the [..., d_sae] pre-activations; take back its edits."""
    d_sae = sae.cfg.d_sae
    latents = candidate_latents(experts, pre.shape[-1])
    dense = scatter_to_dense(pre.flatten(1), latents, d_sae).view(*leading, d_sae)
    hooked = sae.hook_sae_acts_pre(dense).reshape(-1, d_sae)
    return hooked.gather(1, latents).view_as(pre)


def _dense_feature_acts(
    sae: AnyScaleSAE, code: SparseCode, leading: torch.Size
) -> torch.Tensor:
    values, latents = code
    dense = scatter_to_dense(values, latents, sae.cfg.d_sae)
    return sae.hook_sae_acts_post(dense.view(*leading, sae.cfg.d_sae))


def _dense_hidden_pre(
    sae: AnyScaleSAE, encoding: ExpertEncoding, leading: torch.Size
) -> torch.Tensor:
    """Pre-activations of computed latents; 0 for latents of unselected experts."""
    block_size = sae.cfg.d_sae // sae.cfg.n_experts
    latents = candidate_latents(encoding.routing.experts, block_size)
    dense = scatter_to_dense(encoding.candidate_pre, latents, sae.cfg.d_sae)
    return dense.view(*leading, sae.cfg.d_sae)


def _decode_dense(sae: AnyScaleSAE, feature_acts: torch.Tensor) -> torch.Tensor:
    if sae.parallel is not None and sae.parallel.expert_parallel:
        return _finish_decode(sae, _decode_dense_at_owners(sae, feature_acts))
    decoded = act_times_W_dec(
        feature_acts, sae.W_dec, sae.cfg.rescale_acts_by_decoder_norm
    )
    return _finish_decode(sae, decoded)


def _decode_dense_at_owners(
    sae: AnyScaleSAE, feature_acts: torch.Tensor
) -> torch.Tensor:
    """`decode` of [..., d_sae] latents under expert parallelism: each process
    decodes the nonzero latents of its experts. [..., d_in]"""
    cfg, parallel = sae.cfg, sae.parallel
    assert parallel is not None
    flat = feature_acts.reshape(-1, cfg.d_sae)
    n_kept = max(1, int((flat != 0).sum(dim=-1).max())) if flat.shape[0] else 1
    latents = flat.abs().topk(min(n_kept, cfg.d_sae), dim=-1).indices
    decoder = COMPUTE.decoder_for(sae.W_dec, cfg.rescale_acts_by_decoder_norm)
    decoded = decode_at_owners(
        SparseCode(flat.gather(1, latents), latents),
        cfg.d_sae // cfg.n_experts,
        cfg.n_experts,
        parallel,
        lambda own: COMPUTE.decode_sparse(own, decoder),
    )
    return decoded.view(*feature_acts.shape[:-1], cfg.d_in)


def _finish_decode(sae: AnyScaleSAE, decoded: torch.Tensor) -> torch.Tensor:
    """Add b_dec and apply SAELens's output hooks, normalisation and reshaping."""
    sae_out = sae.hook_sae_recons(decoded + sae.b_dec)
    sae_out = sae.run_time_activation_norm_fn_out(sae_out)
    return sae.reshape_fn_out(sae_out, sae.d_head)


def _forward_sparse(
    sae: AnyScaleSAE, x: torch.Tensor, scaling: FeatureScaling | None
) -> torch.Tensor:
    """forward() without ever forming a [tokens, d_sae] tensor."""
    encoding, leading = _routed_encoding(sae, x, scaling)
    decoded = _decode_code(sae, encoding, encoding.code).view(*leading, sae.cfg.d_in)
    return sae.hook_sae_output(_finish_decode(sae, decoded))


def _dead_latent_code(
    candidate_pre: torch.Tensor,  # [tokens, e * m]
    experts: torch.Tensor,  # [tokens, e]
    dead_latents: torch.Tensor,  # [d_sae] bool
    k_aux: int,
) -> SparseCode:
    """The k_aux largest pre-activations among computed dead latents (AuxK's input).

    Picks beyond the computed dead latents come back as zeros.
    """
    latents = candidate_latents(experts, candidate_pre.shape[1] // experts.shape[1])
    is_dead = dead_latents[latents]
    masked = torch.where(is_dead, candidate_pre, float("-inf"))
    k_aux = min(k_aux, masked.shape[1])
    positions = masked.detach().topk(k_aux, sorted=False).indices
    values = torch.where(is_dead.gather(1, positions), masked.gather(1, positions), 0.0)
    return SparseCode(values, latents.gather(1, positions))


def _fold_checkpoint_feature_scaling(sae: ScaleSAE, state_dict: dict[str, Any]) -> None:
    """A training checkpoint's omega and W_lowpass, folded into W_enc as export does.

    Shapes are checked first, so a bad file is named rather than failing in the fold.
    """
    if "omega" not in state_dict:
        return
    cfg = sae.cfg
    needed = {
        "omega": (cfg.n_experts,),
        "W_lowpass": (cfg.d_in, cfg.d_in),
        "W_enc": (cfg.d_in, cfg.d_sae),
    }
    for name, shape in needed.items():
        if name in state_dict and tuple(state_dict[name].shape) != shape:
            check_state_dict(
                {name: torch.empty(shape, device="meta")}, {name: state_dict[name]}
            )
    scaling = FeatureScaling(state_dict.pop("omega"), state_dict.pop("W_lowpass", None))
    state_dict["W_enc"] = fold_feature_scaling(
        state_dict["W_enc"], scaling, cfg.n_experts
    )


def _make_contiguous(state_dict: dict[str, Any]) -> None:
    """safetensors saves contiguous tensors only; lazy Adam stores W_enc by latent."""
    for name, tensor in state_dict.items():
        state_dict[name] = tensor.contiguous()


def _has_hooks(hook: HookPoint) -> bool:
    return bool(hook._forward_hooks) or bool(hook._backward_hooks)


def _needs_dense_path(sae: AnyScaleSAE) -> bool:
    """Hooks on the latents, or an error term, need SAELens's dense forward."""
    return sae.use_error_term or _has_hooks(sae.hook_sae_acts_post)


def _require_decoder_norm_rescaling(sae: AnyScaleSAE) -> None:
    if not sae.cfg.rescale_acts_by_decoder_norm:
        raise NotImplementedError(
            "fold_W_dec_norm would change which latents win the Top-K unless "
            "rescale_acts_by_decoder_norm=True; the SAE was left unchanged."
        )


@torch.no_grad()
def _fold_whitening(
    sae: AnyScaleSAE,
    mean: torch.Tensor,
    whitening_matrix: torch.Tensor,
    unwhitening_matrix: torch.Tensor,
) -> None:
    """Fold z = (x - mean) M into encoder, decoder and router (Feature Scaling folded first)."""
    if sae.cfg.rescale_acts_by_decoder_norm:
        # unwhitening changes decoder row norms and so the Top-K; fold them out first
        sae.fold_W_dec_norm()
        sae.cfg.rescale_acts_by_decoder_norm = False
    SAE.fold_activation_whitening(sae, mean, whitening_matrix, unwhitening_matrix)
    dtype = torch.promote_types(sae.W_router.dtype, whitening_matrix.dtype)
    matrix = whitening_matrix.to(sae.device, dtype)
    sae.W_router.data.copy_(matrix @ sae.W_router.data.to(dtype))
    if not sae.cfg.apply_b_dec_to_input:
        sae.b_router.data.sub_(mean.to(sae.device, dtype) @ sae.W_router.data.to(dtype))
