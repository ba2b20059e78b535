#include "kvferry/kv_layout.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvferry {
namespace {

absl::Status CheckRange(const char* field, uint64_t value, uint64_t max) {
  if (value == 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvLayout.", field, " must be > 0 (got 0)"));
  }
  if (value > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvLayout.", field, " = ", value, " is larger than the maximum ", max));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status KvLayout::Validate() const {
  for (auto [field, value, max] : {std::tuple<const char*, uint64_t, uint64_t>{
                                       "num_layers", num_layers, 1024},
                                   {"num_blocks", num_blocks, uint64_t{1} << 31},
                                   {"tokens_per_block", tokens_per_block, 65536},
                                   {"num_kv_heads", num_kv_heads, 4096},
                                   {"head_dim", head_dim, 65536},
                                   {"element_bytes", element_bytes, 8}}) {
    if (absl::Status s = CheckRange(field, value, max); !s.ok()) return s;
  }
  if (element_bytes != 1 && element_bytes != 2 && element_bytes != 4 && element_bytes != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvLayout.element_bytes = ", element_bytes, " is not 1, 2, 4 or 8"));
  }
  // The per-field limits keep chunk_bytes() below 2^63; the totals can overflow.
  uint64_t chunk = chunk_bytes();
  if (chunk % kChunkAlignment != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KvLayout chunk of ", chunk, " bytes (tokens_per_block * num_kv_heads * head_dim * "
        "element_bytes) is not a multiple of ", kChunkAlignment));
  }
  uint64_t total = 0;
  if (__builtin_mul_overflow(chunk, uint64_t{num_planes()} * num_layers, &total) ||
      __builtin_mul_overflow(total, uint64_t{num_blocks}, &total)) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvLayout total size overflows 64 bits: ", ToString()));
  }
  if (total > kMaxTotalBytes) {
    return absl::InvalidArgumentError(absl::StrCat("KvLayout total of ", total,
                                                   " bytes exceeds the maximum of ",
                                                   kMaxTotalBytes, " bytes: ", ToString()));
  }
  return absl::OkStatus();
}

absl::Status KvLayout::CheckCompatible(const KvLayout& remote) const {
  auto mismatch = [](const char* what, uint64_t local, uint64_t other) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KV layout mismatch: ", what, " is ", local, " here but ", other, " on the peer"));
  };
  if (chunk_bytes() != remote.chunk_bytes()) {
    return mismatch("block bytes per layer", chunk_bytes(), remote.chunk_bytes());
  }
  if (num_layers != remote.num_layers) return mismatch("num_layers", num_layers, remote.num_layers);
  if (num_planes() != remote.num_planes()) {
    return mismatch("planes (K/V)", num_planes(), remote.num_planes());
  }
  if (element_bytes != remote.element_bytes) {
    return mismatch("element_bytes", element_bytes, remote.element_bytes);
  }
  if (tokens_per_block != remote.tokens_per_block) {
    return mismatch("tokens_per_block", tokens_per_block, remote.tokens_per_block);
  }
  return absl::OkStatus();
}

absl::Status KvLayout::CheckHeadSliced(const KvLayout& remote) const {
  auto mismatch = [](const char* what, uint64_t local, uint64_t other) {
    return absl::FailedPreconditionError(absl::StrCat("KV layout mismatch for head slices: ", what,
                                                      " is ", local, " here but ", other,
                                                      " on the peer"));
  };
  if (num_layers != remote.num_layers) return mismatch("num_layers", num_layers, remote.num_layers);
  if (num_planes() != remote.num_planes()) {
    return mismatch("planes (K/V)", num_planes(), remote.num_planes());
  }
  if (tokens_per_block != remote.tokens_per_block) {
    return mismatch("tokens_per_block", tokens_per_block, remote.tokens_per_block);
  }
  if (head_dim != remote.head_dim) return mismatch("head_dim", head_dim, remote.head_dim);
  if (element_bytes != remote.element_bytes) {
    return mismatch("element_bytes", element_bytes, remote.element_bytes);
  }
  const uint32_t more = std::max(num_kv_heads, remote.num_kv_heads);
  const uint32_t fewer = std::min(num_kv_heads, remote.num_kv_heads);
  if (fewer == 0 || more % fewer != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KV layout mismatch for head slices: num_kv_heads is ", num_kv_heads, " here but ",
        remote.num_kv_heads, " on the peer, which is no integer tensor-parallel ratio"));
  }
  return absl::OkStatus();
}

std::string KvLayout::ToString() const {
  return absl::StrCat("{layers=", num_layers, " blocks=", num_blocks,
                      " tokens_per_block=", tokens_per_block, " kv_heads=", num_kv_heads,
                      " head_dim=", head_dim, " element_bytes=", element_bytes,
                      " separate_kv=", separate_kv ? "true" : "false", "}");
}

}  // namespace kvferry
