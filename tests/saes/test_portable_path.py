"""What a GPU would launch and wait for: ops per step independent of N, no host reads.

Ops are counted at PyTorch's dispatcher (each is a kernel launch on a GPU). Host
reads are the ops that make a GPU wait for the CPU (`_local_scalar_dense` behind
`.item()`, `int()` and `float()`, `is_nonzero` behind `bool()`, and ops whose
output size depends on values) plus calls of `.tolist()`, `.cpu()` and `.numpy()`,
which never reach the dispatcher for CPU tensors.
"""

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from torch.utils._python_dispatch import TorchDispatchMode

from saelens_moe import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

D_IN, BLOCK, N_TOKENS, K = 64, 32, 512, 16
HOST_READ_OPS = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.bincount",
}
HOST_READ_METHODS = ("tolist", "cpu", "numpy")


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Counts:
    def __init__(self) -> None:
        self.dispatch = OpCounter()
        self.method_reads: Counter[str] = Counter()

    @property
    def n_ops(self) -> int:
        return sum(self.dispatch.ops.values())

    @property
    def host_reads(self) -> dict[str, int]:
        reads = {op: n for op, n in self.dispatch.ops.items() if op in HOST_READ_OPS}
        return reads | dict(self.method_reads)


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    counts = Counts()
    for name in HOST_READ_METHODS:
        monkeypatch.setattr(
            torch.Tensor, name, _counted(getattr(torch.Tensor, name), name, counts)
        )
    with counts.dispatch:
        yield counts
    monkeypatch.undo()


def _counted(method: Callable[..., Any], name: str, counts: Counts) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts.method_reads[name] += 1
        return method(*args, **kwargs)

    return wrapper


def training_sae(architecture: str, n_experts: int) -> ScaleTrainingSAE:
    fields: dict[str, Any] = {"d_in": D_IN, "d_sae": BLOCK * n_experts, "k": K}
    if architecture == "switch":
        return SwitchTrainingSAE(SwitchTrainingSAEConfig(**fields, n_experts=n_experts))
    return ScaleTrainingSAE(
        ScaleTrainingSAEConfig(**fields, n_experts=n_experts, n_active_experts=2)
    )


def step_input(
    sae: ScaleTrainingSAE, x: torch.Tensor, n_dead: int = 0
) -> TrainStepInput:
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[:n_dead] = True
    return TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 3.0},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def count_training_step(
    monkeypatch: pytest.MonkeyPatch, sae: ScaleTrainingSAE, n_dead: int = 0
) -> Counts:
    x = torch.randn(N_TOKENS, D_IN)
    inputs = step_input(sae, x, n_dead)
    sae.training_forward_pass(inputs).loss.backward()  # warm: lazy state made once
    with counting(monkeypatch) as counts:
        sae.training_forward_pass(inputs).loss.backward()
    return counts


@pytest.mark.parametrize("architecture", ["scale", "switch"])
@pytest.mark.parametrize("n_dead", [0, 40])
def test_a_training_step_dispatches_as_many_ops_at_128_experts_as_at_8(
    monkeypatch: pytest.MonkeyPatch, architecture: str, n_dead: int
) -> None:
    torch.manual_seed(0)
    few = count_training_step(monkeypatch, training_sae(architecture, 8), n_dead)
    many = count_training_step(monkeypatch, training_sae(architecture, 128), n_dead)
    assert abs(many.n_ops - few.n_ops) <= 10, (few.dispatch.ops, many.dispatch.ops)
    assert few.dispatch.ops["saelens_moe.grouped_mm"] == 2  # forward, input gradient
    assert few.dispatch.ops["saelens_moe.grouped_weight_grad"] == 1


@pytest.mark.parametrize("architecture", ["scale", "switch"])
@pytest.mark.parametrize("n_dead", [0, 40])
def test_a_training_step_reads_the_host_once(
    monkeypatch: pytest.MonkeyPatch, architecture: str, n_dead: int
) -> None:
    torch.manual_seed(0)
    counts = count_training_step(monkeypatch, training_sae(architecture, 8), n_dead)
    # the one read: is the loss finite, and how many latents are dead
    assert counts.host_reads == {"tolist": 1}


def inference_sae(n_experts: int) -> ScaleSAE:
    cfg = ScaleSAEConfig(d_in=D_IN, d_sae=BLOCK * n_experts, k=K, n_experts=n_experts)
    return ScaleSAE(cfg)


ENTRY_POINTS: dict[str, Callable[[ScaleSAE, torch.Tensor], object]] = {
    "encode_sparse": ScaleSAE.encode_sparse,
    "encode": ScaleSAE.encode,
    "forward": ScaleSAE.forward,
}


def count_inference(
    monkeypatch: pytest.MonkeyPatch, entry_point: str, n_experts: int
) -> Counts:
    sae, x = inference_sae(n_experts), torch.randn(N_TOKENS, D_IN)
    with torch.no_grad(), counting(monkeypatch) as counts:
        ENTRY_POINTS[entry_point](sae, x)
    return counts


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_inference_dispatches_as_many_ops_at_128_experts_as_at_8(
    monkeypatch: pytest.MonkeyPatch, entry_point: str
) -> None:
    few = count_inference(monkeypatch, entry_point, 8)
    many = count_inference(monkeypatch, entry_point, 128)
    assert abs(many.n_ops - few.n_ops) <= 10, (few.dispatch.ops, many.dispatch.ops)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_inference_never_reads_the_host(
    monkeypatch: pytest.MonkeyPatch, entry_point: str
) -> None:
    assert count_inference(monkeypatch, entry_point, 8).host_reads == {}


def test_the_counter_sees_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.arange(4)
    with counting(monkeypatch) as counts:
        int(x.sum())
        x.tolist()
        x.bincount()
        x.nonzero()
    assert counts.host_reads == {
        "aten._local_scalar_dense": 1,
        "tolist": 1,
        "aten.bincount": 1,
        "aten.nonzero": 1,
    }


def test_torch_compile_gives_eager_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAELens's `compile_sae` compiles `training_forward_pass`; inductor on CPU here."""
    torch.manual_seed(0)
    sae = training_sae("scale", 8)
    x = torch.randn(N_TOKENS, D_IN)
    inputs = step_input(sae, x, n_dead=40)
    eager = sae.training_forward_pass(inputs)
    eager.loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    compiled_step = torch.compile(sae.training_forward_pass)
    compiled = compiled_step(inputs)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.sae_out, eager.sae_out)
    torch.testing.assert_close(compiled.losses, eager.losses)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(sae.encode_sparse)(x), sae.encode_sparse(x)
        )


def test_graph_breaks_are_the_host_read_and_the_sparse_step_output() -> None:
    torch.manual_seed(0)
    sae = training_sae("scale", 8)
    x = torch.randn(N_TOKENS, D_IN)
    assert torch._dynamo.explain(sae.encode_sparse)(x).graph_break_count == 0
    sae.training_forward_pass(step_input(sae, x))  # the first one sets the router
    explained = torch._dynamo.explain(sae.training_forward_pass)(step_input(sae, x))
    reasons = [str(reason.reason) for reason in explained.break_reasons]
    assert explained.graph_break_count == 2, reasons
    host_read = "_local_scalar_dense"  # count_dead_if_loss_finite's one read
    step_output = "torch.compiler.disable"  # the sparse TrainStepOutput
    assert {host_read in reason or step_output in reason for reason in reasons} == {
        True
    }, reasons
    assert any(step_output in reason for reason in reasons), reasons


@pytest.mark.parametrize("d_in", [64, 12], ids=["grouped", "misaligned-fallback"])
@pytest.mark.parametrize(
    "autocast", [False, True], ids=["bf16-params", "bf16-autocast"]
)
def test_bfloat16_trains_with_finite_loss(d_in: int, autocast: bool) -> None:
    torch.manual_seed(0)
    dtype = "float32" if autocast else "bfloat16"
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            d_in=d_in, d_sae=8 * BLOCK, k=K, n_experts=8, dtype=dtype
        )
    )
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(N_TOKENS, d_in, dtype=getattr(torch, dtype))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sae.training_forward_pass(step_input(sae, x, n_dead=40)).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in sae.parameters())
