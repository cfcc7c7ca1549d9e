"""Memory and speed of the feature browser (`saelens_moe.browse`) at GPT-2 scale.

A randomly initialised Scale SAE (d_in 768, d_sae 24576, N 64 experts, e 2, k 32)
reads synthetic activations [contexts, 128, 768] with random token ids from
GPT-2's 50257 (no language model, so the numbers are the browser's own cost:
`encode_sparse`, routing, and the streaming statistics). Then the page is written
with a page for every latent: logits through a random unembedding [768, 50257]
and the embedded JSON.

Each token count runs in a fresh process, so peak resident memory (ru_maxrss) is
that count's alone; the table shows it after setup (SAE, unembedding, empty
statistics), after the streaming pass and after writing the page. Flat peaks
across token counts show memory does not grow with tokens.

    python benchmarks/browse.py            # 2^17 .. 2^20 tokens (about ten minutes on 2 cores)
    python benchmarks/browse.py --quick    # small sizes, seconds
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata

from saelens_moe import ScaleSAE, ScaleSAEConfig
from saelens_moe.browse.build import BrowseConfig, write_browser
from saelens_moe.browse.collect import Batch, Collector, sparse_latents
from saelens_moe.metrics import route_activations

MIB = 2**20
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Sizes:
    d_in: int
    d_sae: int
    n_experts: int
    n_active_experts: int
    k: int
    d_vocab: int
    context_size: int
    batch_tokens: int
    token_counts: tuple[int, ...]


FULL = Sizes(768, 24576, 64, 2, 32, 50257, 128, 4096, (2**17, 2**18, 2**19, 2**20))
QUICK = Sizes(64, 1024, 16, 2, 8, 1000, 32, 1024, (2**12, 2**13))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_batch(sizes: Sizes, generator: torch.Generator) -> Batch:
    contexts = sizes.batch_tokens // sizes.context_size
    shape = (contexts, sizes.context_size)
    activations = torch.randn(*shape, sizes.d_in, generator=generator)
    tokens = torch.randint(0, sizes.d_vocab, shape, generator=generator)
    return Batch(activations, tokens)


def measure(sizes: Sizes, n_tokens: int, output: Path) -> dict[str, Any]:
    """One streaming pass over n_tokens and the page written; run in a fresh process."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    metadata = SAEMetadata(hook_name="blocks.8.hook_resid_post", model_name="gpt2")
    sae = ScaleSAE(
        ScaleSAEConfig(
            d_in=sizes.d_in,
            d_sae=sizes.d_sae,
            n_experts=sizes.n_experts,
            n_active_experts=sizes.n_active_experts,
            k=sizes.k,
            metadata=metadata,
        )
    )
    W_U = torch.randn(sizes.d_in, sizes.d_vocab) / sizes.d_in**0.5
    config = BrowseConfig(
        n_tokens=n_tokens,
        context_size=sizes.context_size,
        batch_tokens=sizes.batch_tokens,
    )
    collector = Collector(
        sae, config.n_examples, config.window, config.n_bins, sizes.d_vocab
    )
    warm_up = synthetic_batch(sizes, generator).activations.flatten(0, 1)
    sparse_latents(sae, warm_up)  # first calls pay one-off setup costs
    route_activations(sae, warm_up)
    setup_mib = peak_rss_mib()
    collect_s = 0.0
    while collector.n_tokens < n_tokens:
        batch = synthetic_batch(sizes, generator)  # not timed
        start = time.perf_counter()
        collector.add(batch)
        collect_s += time.perf_counter() - start
    collect_mib = peak_rss_mib()
    start = time.perf_counter()
    page = write_browser(
        collector, output, config, [], W_U, lambda ids: [f"t{i}" for i in ids]
    )
    write_s = time.perf_counter() - start
    return {
        "n_tokens": collector.n_tokens,
        "collect_s": collect_s,
        "collect_s_per_million_tokens": collect_s * 1e6 / collector.n_tokens,
        "write_s": write_s,
        "page_mib": page.path.stat().st_size / MIB,
        "latent_pages": len(page.latents),
        "peak_rss_mib_after_setup": setup_mib,
        "peak_rss_mib_after_collect": collect_mib,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_worker(sizes_name: str, n_tokens: int) -> dict[str, Any]:
    """`measure` in a fresh Python process (its own peak memory)."""
    result = subprocess.run(
        [sys.executable, __file__, "--worker", sizes_name, str(n_tokens)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tokens | collect s | s per 1M tokens | write page s | page MiB "
        "| peak RSS MiB: setup | after pass | after page |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['n_tokens']:,} | {row['collect_s']:.1f} "
            f"| {row['collect_s_per_million_tokens']:.1f} | {row['write_s']:.1f} "
            f"| {row['page_mib']:.1f} | {row['peak_rss_mib_after_setup']:.0f} "
            f"| {row['peak_rss_mib_after_collect']:.0f} | {row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Memory and speed of the feature browser."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        sizes = QUICK if args.worker[0] == "quick" else FULL
        with tempfile.TemporaryDirectory() as folder:
            row = measure(sizes, int(args.worker[1]), Path(folder) / "browser.html")
        print(json.dumps(row))
        return row
    name = "quick" if args.quick else "full"
    sizes = QUICK if args.quick else FULL
    load_start = os.getloadavg()
    rows = [run_worker(name, n) for n in sizes.token_counts]
    report = {
        "sizes": asdict(sizes),
        "machine": machine(),
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    table = markdown(rows)
    print(table)
    print(f"\nLoad average (1, 5, 15 min) at start {load_start}, end {os.getloadavg()}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.output_dir / f"browse{suffix}.json").write_text(json.dumps(report, indent=2))
    (args.output_dir / f"browse{suffix}.md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
