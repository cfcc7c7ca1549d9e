"""Faster versions of `moe`'s four compute functions, with the same names and values.

- `selected_expert_matmuls`: one grouped matmul over the selected experts only.
- `decoder_for` and `decode_sparse`: one embedding bag over the kept rows, and
  W_dec's gradient written once.
- `keep_top_k`: backward over the kept entries only.

Only `scale_sae.py` imports this subpackage, in one line (`fast as COMPUTE`); with
`moe as COMPUTE` there the model runs on the plain versions, and this folder can go.
"""

from saelens_moe.saes.fast.decoder import decode_sparse, decoder_for
from saelens_moe.saes.fast.grouped import selected_expert_matmuls
from saelens_moe.saes.fast.top_k import keep_top_k

__all__ = ["decode_sparse", "decoder_for", "keep_top_k", "selected_expert_matmuls"]
