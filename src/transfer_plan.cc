#include "src/transfer_plan.h"

#include <algorithm>
#include <utility>

#include "src/region_map.h"

namespace kvferry::internal {

std::vector<CopyOp> PlanCopies(const KvLayout& local_layout, uint64_t local_regions,
                               const KvLayout& remote_layout, uint64_t remote_regions,
                               std::span<const uint32_t> local, std::span<const uint32_t> remote,
                               uint32_t layer_begin, uint32_t layer_end,
                               const ChunkSlice& slice) {
  std::vector<std::pair<uint32_t, uint32_t>> pairs(local.size());
  for (size_t i = 0; i < local.size(); ++i) pairs[i] = {local[i], remote[i]};
  std::sort(pairs.begin(), pairs.end());

  struct Run {
    uint32_t local, remote, count;
  };
  std::vector<Run> runs;
  for (const auto& [l, r] : pairs) {
    if (!runs.empty()) {
      Run& last = runs.back();
      if (l == last.local + last.count && r == last.remote + last.count) {
        ++last.count;
        continue;
      }
    }
    runs.push_back({l, r, 1});
  }

  const uint64_t here_chunk = local_layout.chunk_bytes();
  const uint64_t there_chunk = remote_layout.chunk_bytes();
  const uint64_t bytes = slice.bytes == 0 ? here_chunk : slice.bytes;
  // A run is contiguous on both sides only when each copy is a whole chunk
  // on both; a slice narrower than either side's chunk leaves a gap between
  // consecutive blocks there, so each block is its own copy.
  const bool whole = bytes == here_chunk && bytes == there_chunk;
  std::vector<CopyOp> ops;
  ops.reserve((whole ? runs.size() : pairs.size()) * (layer_end - layer_begin) *
              local_layout.num_planes());
  for (uint32_t layer = layer_begin; layer < layer_end; ++layer) {
    for (uint32_t plane = 0; plane < local_layout.num_planes(); ++plane) {
      const PlaneAt here = LocatePlane(local_layout, local_regions, layer, plane);
      const PlaneAt there = LocatePlane(remote_layout, remote_regions, layer, plane);
      for (const Run& run : runs) {
        if (whole) {
          ops.push_back({here.region, here.offset + here_chunk * run.local, there.region,
                         there.offset + there_chunk * run.remote, bytes * run.count});
          continue;
        }
        for (uint32_t i = 0; i < run.count; ++i) {
          ops.push_back({here.region,
                         here.offset + here_chunk * (run.local + i) + slice.local_offset,
                         there.region,
                         there.offset + there_chunk * (run.remote + i) + slice.remote_offset,
                         bytes});
        }
      }
    }
  }
  return ops;
}

}  // namespace kvferry::internal
