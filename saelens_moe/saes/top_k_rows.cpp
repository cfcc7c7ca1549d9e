// Top-K over rows of float32 candidates, run on PyTorch's OpenMP thread pool.
//
// top_k_positions: positions of the k largest entries of each row of a matrix.
// selected_expert_top_k: the same over each token's selected-expert candidates,
// built on the fly from the grouped matmul outputs with the encoder epilogue.
//
// Order: larger value first, NaN above every number, -0 just below +0, and on
// equal values the lower position first; the k positions of a row come out in no order.
//
// Per row: split the row into k groups; the smallest group maximum t is a value at
// least k entries reach, so every entry of the top k is >= t. Entries above t are
// usually a small share of the row (about 1/6 of 768 ReLU candidates), and only
// those go through a branch-free quickselect.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

// The per-row loops, compiled for AVX-512 and AVX2 as well as the baseline; the
// loader picks the clone the CPU supports when the library is loaded.
#if defined(__x86_64__) && defined(__linux__)
#define CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPU_CLONES
#endif

namespace {

// Unsigned keys that order floats as numbers, with NaN above +inf (and -0 just
// below +0); branch-free so the compiler vectorises it.
uint32_t order_key(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  const uint32_t key = bits ^ (negative | 0x80000000u);
  return value != value ? UINT32_MAX : key;
}

// Larger key first; on equal keys the lower position gives the larger entry.
uint64_t entry(uint32_t key, int64_t position) {
  return (static_cast<uint64_t>(key) << 32) | (UINT32_MAX - static_cast<uint32_t>(position));
}

int64_t position_of(uint64_t packed) {
  return UINT32_MAX - static_cast<uint32_t>(packed);
}

// Moves the k largest of n distinct entries to entries[0..k); scratch holds n.
// Quickselect whose partition sends each entry to one end or the other without
// a branch, ping-ponging between the two arrays; std::nth_element finishes if
// pivots keep failing.
CPU_CLONES void select_largest(uint64_t* entries, int64_t n, int64_t k, uint64_t* scratch) {
  uint64_t* from = entries;
  uint64_t* to = scratch;
  int64_t chosen = 0;     // from[0..chosen) are among the k largest
  int64_t remaining = n;  // candidates for the rest: from[chosen..chosen + remaining)
  for (int round = 0; remaining > k - chosen && round < 64; ++round) {
    const uint64_t* window = from + chosen;
    const uint64_t a = window[0], b = window[remaining / 2], c = window[remaining - 1];
    const uint64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    int64_t low = chosen, high = chosen + remaining - 1;
    for (int64_t i = 0; i < remaining; ++i) {
      const uint64_t candidate = window[i];
      const bool above = candidate > pivot;
      to[low] = candidate;
      to[high] = candidate;
      low += above;
      high -= !above;
    }
    std::copy(from, from + chosen, to);
    std::swap(from, to);
    const int64_t n_above = low - chosen;
    if (n_above >= k - chosen) {
      remaining = n_above;  // the rest of the k lie above the pivot
    } else {
      chosen = low;  // all of those above are in; look below for the rest
      remaining -= n_above;
    }
  }
  if (remaining > k - chosen) {
    std::nth_element(from + chosen, from + (k - 1), from + chosen + remaining,
                     std::greater<uint64_t>());
  }
  if (from != entries) std::copy(from, from + k, entries);
}

struct RowBuffers {
  explicit RowBuffers(int64_t n_cols) : keys(n_cols), above(n_cols), scratch(n_cols) {}
  std::vector<uint32_t> keys;
  std::vector<uint64_t> above;
  std::vector<uint64_t> scratch;
};

CPU_CLONES void top_k_of_row(const float* values, int64_t n_cols, int64_t k, RowBuffers& buffers,
                  int64_t* positions) {
  uint32_t* keys = buffers.keys.data();
  uint64_t* above = buffers.above.data();
  for (int64_t column = 0; column < n_cols; ++column) keys[column] = order_key(values[column]);
  const int64_t group_size = n_cols / k;  // at least k groups
  uint32_t bound = UINT32_MAX;  // min over groups of the group maximum
  for (int64_t start = 0; start < n_cols; start += group_size) {
    const int64_t end = std::min(n_cols, start + group_size);
    uint32_t group_max = 0;
    for (int64_t column = start; column < end; ++column) group_max = std::max(group_max, keys[column]);
    bound = std::min(bound, group_max);
  }
  int64_t n_above = 0;
  for (int64_t column = 0; column < n_cols; ++column) {
    above[n_above] = entry(keys[column], column);
    n_above += keys[column] > bound;
  }
  if (n_above >= k) {
    select_largest(above, n_above, k, buffers.scratch.data());
    for (int64_t slot = 0; slot < k; ++slot) positions[slot] = position_of(above[slot]);
    return;
  }
  // everything above the bound, then the first entries equal to it
  for (int64_t slot = 0; slot < n_above; ++slot) positions[slot] = position_of(above[slot]);
  for (int64_t column = 0, slot = n_above; slot < k; ++column) {
    if (keys[column] == bound) positions[slot++] = column;
  }
}

struct ExpertEpilogue {
  const float* grouped_pre;     // [pairs, block_size], rows grouped by expert
  const int64_t* grouped_row;   // [tokens, n_active] row of each (token, slot)
  const int64_t* experts;       // [tokens, n_active]
  const float* scale;           // [tokens, n_active] (1 + omega), or null
  const float* shift;           // [tokens, n_active] omega (a . x), or null
  const float* weights;         // [tokens, n_active], all >= 0
  const float* bias;            // [d_sae]
  const float* norms;           // [d_sae], or null
  int64_t n_active;
  int64_t block_size;
};

// Weighted ReLU candidates of one token, in one pass per slot with the operations
// in the order the PyTorch path applies them: Feature Scaling, bias, decoder norm,
// weight, ReLU. Without Feature Scaling, x * 1 - 0 leaves every value as it was.
CPU_CLONES void token_candidates(const ExpertEpilogue& epilogue, int64_t token, float* row) {
  const int64_t m = epilogue.block_size;
  for (int64_t slot = 0; slot < epilogue.n_active; ++slot) {
    const int64_t pair = token * epilogue.n_active + slot;
    const float* pre = epilogue.grouped_pre + epilogue.grouped_row[pair] * m;
    const int64_t first_latent = epilogue.experts[pair] * m;
    const float* bias = epilogue.bias + first_latent;
    const float scale = epilogue.scale != nullptr ? epilogue.scale[pair] : 1.0f;
    const float shift = epilogue.shift != nullptr ? epilogue.shift[pair] : 0.0f;
    const float weight = epilogue.weights[pair];
    float* out = row + slot * m;
    if (epilogue.norms != nullptr) {
      const float* norms = epilogue.norms + first_latent;
      for (int64_t j = 0; j < m; ++j) {
        out[j] = std::max((pre[j] * scale - shift + bias[j]) * norms[j] * weight, 0.0f);
      }
    } else {
      for (int64_t j = 0; j < m; ++j) {
        out[j] = std::max((pre[j] * scale - shift + bias[j]) * weight, 0.0f);
      }
    }
  }
}

}  // namespace

extern "C" void top_k_positions(const float* matrix, int64_t n_rows,
                                int64_t n_cols, int64_t k, int64_t* positions,
                                int64_t n_threads) {
#pragma omp parallel num_threads(static_cast<int>(n_threads))
  {
    RowBuffers buffers(n_cols);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n_rows; ++row) {
      top_k_of_row(matrix + row * n_cols, n_cols, k, buffers, positions + row * k);
    }
  }
}

extern "C" void selected_expert_top_k(
    const float* grouped_pre, const int64_t* grouped_row, const int64_t* experts,
    const float* scale, const float* shift, const float* weights, const float* bias,
    const float* norms, int64_t n_tokens, int64_t n_active, int64_t block_size,
    int64_t k, float* values, int64_t* latents, int64_t n_threads) {
  const ExpertEpilogue epilogue{grouped_pre, grouped_row, experts, scale, shift,
                                weights, bias, norms, n_active, block_size};
  const int64_t n_cols = n_active * block_size;
#pragma omp parallel num_threads(static_cast<int>(n_threads))
  {
    std::vector<float> row(n_cols);
    RowBuffers buffers(n_cols);
    std::vector<int64_t> positions(k);
#pragma omp for schedule(static)
    for (int64_t token = 0; token < n_tokens; ++token) {
      token_candidates(epilogue, token, row.data());
      top_k_of_row(row.data(), n_cols, k, buffers, positions.data());
      for (int64_t slot = 0; slot < k; ++slot) {
        const int64_t position = positions[slot];
        const int64_t expert = experts[token * n_active + position / block_size];
        values[token * k + slot] = row[position];
        latents[token * k + slot] = expert * block_size + position % block_size;
      }
    }
  }
}
