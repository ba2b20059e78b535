// Where each (layer, plane) of a pool lives among its registered regions.
//
// A pool is 1, num_layers, or num_layers * num_planes regions:
//   1 region:          the whole KvLayout in one range (kvferry's own arenas,
//                      or one engine tensor holding every layer);
//   num_layers:        one range per layer holding its planes in order
//                      (vLLM: one tensor per layer of shape [2, blocks, ...]);
//   layers * planes:   one range per layer and plane, index layer * planes +
//                      plane (vLLM: separate K and V tensors per layer).
// Inside a plane, block b starts b * chunk_bytes() after the plane's start.
// When two shapes coincide (one layer, or one plane) they place every byte
// at the same offset, so the count alone decides.
#ifndef KVFERRY_SRC_REGION_MAP_H_
#define KVFERRY_SRC_REGION_MAP_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvferry/kv_layout.h"

namespace kvferry::internal {

// Most regions a pool may have: every plane of KvLayout's largest layer count.
inline constexpr uint32_t kMaxRegions = 2 * 1024;

struct PlaneAt {
  uint32_t region;
  uint64_t offset;  // of block 0 from the region's base
};

// REQUIRES: CheckRegionCount(layout, num_regions).ok().
inline PlaneAt LocatePlane(const KvLayout& layout, uint64_t num_regions, uint32_t layer,
                           uint32_t plane) {
  if (num_regions == 1) return {0, layout.Offset(layer, plane, 0)};
  if (num_regions == layout.num_layers) return {layer, plane * layout.plane_bytes()};
  return {layer * layout.num_planes() + plane, 0};
}

// The bytes each region must hold. REQUIRES: as LocatePlane.
inline uint64_t RegionBytes(const KvLayout& layout, uint64_t num_regions) {
  if (num_regions == 1) return layout.total_bytes();
  if (num_regions == layout.num_layers) return layout.layer_bytes();
  return layout.plane_bytes();
}

// kInvalidArgument naming `what` unless the count is one of the three shapes.
// REQUIRES: layout.Validate().ok().
inline absl::Status CheckRegionCount(absl::string_view what, const KvLayout& layout,
                                     uint64_t num_regions) {
  const uint64_t per_plane = uint64_t{layout.num_layers} * layout.num_planes();
  if (num_regions == 1 || num_regions == layout.num_layers || num_regions == per_plane) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      what, " has ", num_regions, " regions; a layout of ", layout.num_layers, " layers and ",
      layout.num_planes(), " planes takes 1 (everything), ", layout.num_layers,
      " (one per layer) or ", per_plane, " (one per layer and plane)"));
}

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_REGION_MAP_H_
