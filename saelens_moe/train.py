"""Train a Scale or Switch SAE from the command line, exactly as SAELens's runner does.

    python -m saelens_moe.train --architecture scale --n_experts 64 ...
    saelens-moe-train --architecture scale ... --push my-org/my-saes
    torchrun --nproc_per_node 8 -m saelens_moe.train ... [--expert_parallel]

Every flag of `python -m sae_lens.llm_sae_training_runner` works (this module
imports `saelens_moe`, which registers "scale" and "switch", then hands the
arguments to SAELens's own parser). The flags below are added on top. Under
torchrun every process runs this command; `saelens_moe.distributed` says what they
share (`--train_batch_size_tokens` is the global batch).
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from torch.distributed.elastic.multiprocessing.errors import record
from transformer_lens import HookedRootModule

from saelens_moe import __version__  # importing saelens_moe registers the architectures
from saelens_moe.distributed import (
    ARCHITECTURES,
    DEFAULT_TIMEOUT_S,
    DistributedSAETrainingRunner,
    join_process_group,
)
from saelens_moe.hub import push_to_hub
from saelens_moe.lazy_adam import check_betas
from saelens_moe.trainer import MoESAETrainingRunner

HELP_FLAGS = ("-h", "--help")


class AddedArgs(NamedTuple):
    """The flags this command adds to SAELens's."""

    push: str | None
    """Hub repo id to upload the trained SAE to, or None."""
    push_sae_id: str | None
    """Folder of the SAE inside the repo; None means the hook name."""
    push_private: bool
    """Create the repo as private if it does not exist yet."""
    expert_parallel: bool = False
    """Under torchrun, give each process N/P of the experts (else data parallel)."""
    collective_timeout_s: float = DEFAULT_TIMEOUT_S
    """Under torchrun, seconds a process waits for the others before failing."""
    lazy_adam: bool = False
    """Update expert weights only on the latents each step touched."""
    fused_adam: bool = True
    """PyTorch's fused Adam for the weights updated densely."""


def _added_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelens-moe-train",
        add_help=False,
        allow_abbrev=False,
        description=f"saelens-moe {__version__}: flags added to SAELens's runner "
        "flags (listed after these).",
    )
    parser.add_argument(
        "--push",
        metavar="REPO_ID",
        help="after training, upload output_path to this Hugging Face repo with a "
        "model card (token from HF_TOKEN or `hf auth login`)",
    )
    parser.add_argument(
        "--push_sae_id",
        metavar="SAE_ID",
        help="folder of the SAE in the repo, the sae_id for SAE.from_pretrained "
        "(default: the hook name)",
    )
    parser.add_argument(
        "--push_private",
        action="store_true",
        help="create the repo as private if it does not exist",
    )
    parser.add_argument(
        "--expert_parallel",
        action="store_true",
        help="under torchrun, each process holds n_experts / nproc of the experts "
        "(default: every process holds the whole SAE, data parallel)",
    )
    parser.add_argument(
        "--collective_timeout_s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="under torchrun, seconds a process waits for the others before the "
        "job fails",
    )
    parser.add_argument(
        "--lazy_adam",
        action="store_true",
        help="update W_enc, W_dec and b_enc only on the latents each step touched "
        "(saelens_moe.lazy_adam; scale and switch only)",
    )
    parser.add_argument(
        "--no_fused_adam",
        dest="fused_adam",
        action="store_false",
        help="PyTorch's per-tensor Adam, as SAELens, instead of its fused Adam "
        "(with --lazy_adam: the touched rows updated op by op, not compiled)",
    )
    return parser


def split_args(argv: Sequence[str]) -> tuple[AddedArgs, list[str]]:
    """Separate this command's flags from the ones for SAELens's parser."""
    parser = _added_parser()
    if any(flag in argv for flag in HELP_FLAGS) or not argv:
        parser.print_help()
        print()
    known, rest = parser.parse_known_args(list(argv))
    extra = AddedArgs(
        known.push,
        known.push_sae_id,
        known.push_private,
        known.expert_parallel,
        known.collective_timeout_s,
        known.lazy_adam,
        known.fused_adam,
    )
    return extra, rest


def parse_args(
    argv: Sequence[str],
) -> tuple[LanguageModelSAERunnerConfig[Any], AddedArgs]:
    """The runner config (parsed by SAELens) and the flags this command adds."""
    added, rest = split_args(argv)
    cfg = _parse_cfg_args(rest)
    if added.push is not None and cfg.output_path is None:
        raise ValueError("--push needs an --output_path to upload from")
    architecture = cfg.sae.architecture()
    if added.lazy_adam and architecture not in ARCHITECTURES:
        raise ValueError(
            f"--lazy_adam needs --architecture scale or switch, got {architecture!r}"
        )
    if added.lazy_adam:
        check_betas((cfg.adam_beta1, cfg.adam_beta2))
    return cfg, added


def run(
    argv: Sequence[str],
    *,
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> Path | None:
    """Parse, train with SAELens's runner, optionally push; returns the output folder.

    `override_model` and `override_dataset` are passed to the runner, for runs
    with a local model or dataset (as with `LanguageModelSAETrainingRunner`).
    """
    cfg, added = parse_args(argv)
    parallel = join_process_group(added.expert_parallel, added.collective_timeout_s)
    if parallel is None:
        runner = MoESAETrainingRunner(
            cfg,
            added.lazy_adam,
            added.fused_adam,
            override_dataset=override_dataset,
            override_model=override_model,
        )
    else:
        runner = DistributedSAETrainingRunner(
            cfg,
            parallel,
            override_dataset=override_dataset,
            override_model=override_model,
            lazy_adam=added.lazy_adam,
            fused_adam=added.fused_adam,
        )
    runner.run()
    if cfg.output_path is None or (parallel is not None and parallel.rank != 0):
        return None
    output = Path(cfg.output_path)
    if added.push is not None:
        sae_id = added.push_sae_id or cfg.hook_name
        url = push_to_hub({sae_id: output}, added.push, private=added.push_private)
        print(f"Uploaded {output} to {url} as {sae_id!r}")
    return output


@record  # under torchrun: the failing rank's traceback in the job's error summary
def main() -> None:
    """Console entry point (`saelens-moe-train`)."""
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
