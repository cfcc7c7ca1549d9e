"""Faster versions of `moe`'s four compute functions, with the same names and values.

- `selected_expert_matmuls`: one grouped matmul over the selected experts only.
- `decoder_for` and `decode_sparse`: one embedding bag over the kept rows, and
  W_dec's gradient written once.
- `keep_top_k`: backward over the kept entries only.

Nothing else in the package depends on this subpackage: with
`scale_sae.COMPUTE = moe` the model runs on the plain versions.
"""

from saelens_moe.saes.fast.decoder import decode_sparse, decoder_for
from saelens_moe.saes.fast.grouped import selected_expert_matmuls
from saelens_moe.saes.fast.top_k import keep_top_k

__all__ = ["decode_sparse", "decoder_for", "keep_top_k", "selected_expert_matmuls"]
