"""Faster versions of `moe`'s four compute functions, with the same names and values.

- `selected_expert_matmuls`: one grouped matmul over the selected experts only.
- `decoder_for` and `decode_sparse`: one embedding bag over the kept rows, and
  W_dec's gradient written once.
- `keep_top_k`: backward over the kept entries only.

`grouped.expert_matmul_path` says which path the expert matmuls take on a device,
dtype and GPU; `autocast` answers autocast queries for every device (meta too).

In the package only `scale_sae.py` imports this subpackage, in one line (`fast as
COMPUTE`); with `moe as COMPUTE` there the model runs on the plain versions, and this
folder can go (with `benchmarks/throughput.py`'s record of the matmul path).
"""

from saelens_moe.saes.fast.decoder import decode_sparse, decoder_for
from saelens_moe.saes.fast.grouped import selected_expert_matmuls
from saelens_moe.saes.fast.top_k import keep_top_k

__all__ = ["decode_sparse", "decoder_for", "keep_top_k", "selected_expert_matmuls"]
