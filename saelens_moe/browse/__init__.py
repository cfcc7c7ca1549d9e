"""A feature browser for any SAELens SAE, with expert views for routed (MoE) SAEs.

    python -m saelens_moe.browse --sae_path output/sae --prompt "The cat sat on the mat"
    python -m saelens_moe.browse --release org/repo --sae_id blocks.8.hook_resid_post/scale_e2_k32
    python -m saelens_moe.browse --smoke --output browser.html   # tiny local model, no network

`browse(sae, output, model=..., tokens=..., prompts=...)` writes one
self-contained HTML file (data, styles and script inline; it opens from disk
with no network) with a view per latent (top-activating contexts shaded by
activation, activation histogram, firing density, the top logits of its decoder
direction through the unembedding, its expert), per expert of a Scale / Switch
SAE (load, its latents' densities, omega, the tokens routed to it) and per prompt
(each token's experts and kept latents, linked to the latent views).

Latents come from the SAE's own `encode_sparse` (Scale / Switch) or `encode`
(every other SAELens SAE), never from slices of its weights, which global Top-K
and routing make invalid. One streaming pass keeps, per latent, its best
`n_examples` (value, context, position) triples with their windows and an
activation histogram, so memory does not grow with the number of tokens
(`saelens_moe.browse.collect`).

Modules: `collect` (streaming statistics), `sources` (tokens, activations, token
strings), `build` (`browse` and the page's data), `page` (HTML, CSS and the
vanilla-JS renderer), `cli` (the command line).
"""

from saelens_moe.browse.build import BrowseConfig, BrowserPage, browse
from saelens_moe.browse.cli import main

__all__ = ["BrowseConfig", "BrowserPage", "browse", "main"]
