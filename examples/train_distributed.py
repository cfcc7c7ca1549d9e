"""Train one Scale SAE of the paper's GPT-2 setting on several processes.

Data parallel by default (every process holds the SAE, reads its share of the
tokens, gradients are averaged); `--expert_parallel` gives each process N/P of the
experts. `--batch_tokens` is the global batch, so the same command trains the
same SAE on any number of processes.

    torchrun --nproc_per_node 8 examples/train_distributed.py
    torchrun --nproc_per_node 8 examples/train_distributed.py --expert_parallel
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 examples/train_distributed.py --expert_parallel
    torchrun --nproc_per_node 2 examples/train_distributed.py --smoke   # CPU, gloo
    python examples/train_distributed.py --smoke   # the same run in one process
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig
from torch.distributed.elastic.multiprocessing.errors import record
from train_gpt2_layer8 import (
    PAPER,
    Setting,
    add_common_flags,
    local_overrides,
    push_if_asked,
    sae_config,
    shared_runner_fields,
    smoke_setting,
)

from saelens_moe.distributed import (
    DEFAULT_TIMEOUT_S,
    DistributedSAETrainingRunner,
    join_process_group,
)
from saelens_moe.trainer import MoESAETrainingRunner


def smoke_tokens_setting() -> Setting:
    """The smoke run with batches of whole rows, served in order: 8 steps of 128 tokens."""
    return smoke_setting()._replace(steps=8, batch_tokens=128, n_batches_in_buffer=8)


def runner_config(
    setting: Setting, args: argparse.Namespace
) -> LanguageModelSAERunnerConfig[Any]:
    fields = shared_runner_fields(setting, args.device, args.wandb)
    fields["checkpoint_path"] = args.checkpoint_path
    if args.smoke:  # in order, so one process and several see the same batches
        fields |= {
            "streaming": False,
            "activations_mixing_fraction": 0.0,
            "store_batch_size_prompts": 4,
        }
    return LanguageModelSAERunnerConfig(
        sae=sae_config(setting, args.n_active_experts, args.k, 0.0),
        hook_name=setting.hook_name,
        is_dataset_tokenized=args.smoke,
        output_path=str(args.output_path),
        n_checkpoints=args.n_checkpoints,
        seed=args.seed,
        **fields,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_active_experts", "-e", type=int, default=2, help="e")
    parser.add_argument("--k", "-k", type=int, default=32, help="K, latents per token")
    parser.add_argument(
        "--expert_parallel",
        action="store_true",
        help="each process holds n_experts / nproc experts (default: data parallel)",
    )
    parser.add_argument("--collective_timeout_s", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument(
        "--lazy_adam",
        action="store_true",
        help="update only the latents each step touched (pays from ~1e5 latents)",
    )
    parser.add_argument("--output_path", type=Path, default=Path("output/gpt2-l8-dp"))
    parser.add_argument("--checkpoint_path", default=None)
    parser.add_argument("--n_checkpoints", type=int, default=0)
    add_common_flags(parser)
    return parser.parse_args(argv)


@record  # under torchrun: the failing rank's traceback in the job's error summary
def main(argv: Sequence[str] | None = None) -> Path | None:
    """Train on every process torchrun started (or this one); rank 0's output folder."""
    args = parse_args(argv)
    parallel = join_process_group(args.expert_parallel, args.collective_timeout_s)
    torch.manual_seed(args.seed)
    setting = smoke_tokens_setting() if args.smoke else PAPER
    overrides = local_overrides(setting, args.smoke)
    cfg = runner_config(setting, args)
    if parallel is None:
        MoESAETrainingRunner(cfg, lazy_adam=args.lazy_adam, **overrides).run()
    else:
        runner = DistributedSAETrainingRunner(
            cfg, parallel, lazy_adam=args.lazy_adam, **overrides
        )
        runner.run()
        if parallel.rank != 0:
            return None
    push_if_asked(setting, args)
    print(f"Saved the Scale SAE to {args.output_path}")
    return args.output_path


if __name__ == "__main__":
    main()
