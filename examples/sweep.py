"""Train several Scale SAEs (e in {2, 4, 8} by default) from one pass of GPT-2.

SAELens's `MultiSAETrainingRunner` runs the language model once per batch and
feeds the same activations to every SAE, each with its own optimizer and
schedule, so a sweep over e costs one model forward instead of one per SAE.
Settings are the paper's (see train_gpt2_layer8.py).

    python examples/sweep.py --n_active_experts 2 4 8 --k 32
    python examples/sweep.py --smoke          # tiny local model, seconds on a CPU

Each SAE is saved to `<output_path>/scale_e<e>_k<K>/`, a folder that
`SAE.load_from_disk` and `saelens_moe.hub.push_to_hub` accept.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from sae_lens.multi_sae_training_runner import (
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
)
from train_gpt2_layer8 import (
    PAPER,
    Setting,
    add_common_flags,
    local_overrides,
    sae_config,
    shared_runner_fields,
    smoke_setting,
)

from saelens_moe.hub import push_to_hub


def sweep_config(
    setting: Setting, args: argparse.Namespace
) -> MultiSAETrainingRunnerConfig:
    """One Scale SAE per value of e, all reading `setting.hook_name`."""
    saes = {
        f"scale_e{e}_k{args.k}": sae_config(
            setting, e, args.k, args.aux_loss_coefficient
        )
        for e in args.n_active_experts
    }
    return MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names=setting.hook_name,
        output_path=str(args.output_path),
        **shared_runner_fields(setting, args.device, args.wandb),
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n_active_experts", "-e", type=int, nargs="+", default=[2, 4, 8]
    )
    parser.add_argument("--k", "-k", type=int, default=32)
    parser.add_argument("--aux_loss_coefficient", type=float, default=0.0)
    parser.add_argument("--output_path", type=Path, default=Path("output/sweep"))
    add_common_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Train the sweep; returns each SAE's output folder by name."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    setting = smoke_setting() if args.smoke else PAPER
    overrides = local_overrides(setting, args.smoke)
    cfg = sweep_config(setting, args)
    saes = MultiSAETrainingRunner(cfg, **overrides).run()
    folders = {name: args.output_path / name for name in saes}
    if args.push:
        sae_ids = {
            f"{setting.hook_name}/{name}": path for name, path in folders.items()
        }
        print("Uploaded to", push_to_hub(sae_ids, args.push))
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return folders


if __name__ == "__main__":
    main()
