// Which path put/get to a peer take, as UCX 1.13 decides it: asked of UCX
// once the data endpoint exists and the peer's remote keys are unpacked.
//
// UCX 1.13 has no API that names the protocol an RMA operation will use
// (ucp_ep_query reports names and addresses only), so the answer is built
// from two things it does expose: ucp_rkey_ptr, which succeeds exactly when
// UCX has mapped the remote memory into this process (a shared-memory
// segment: put/get are then memcpy by the initiator), and the endpoint's
// lanes and RMA lanes as ucp_ep_print_info prints them.
#ifndef KVFERRY_SRC_UCX_DATA_PATH_H_
#define KVFERRY_SRC_UCX_DATA_PATH_H_

#include <cstdint>
#include <string>

#include <ucp/api/ucp.h>

#include "absl/strings/string_view.h"

namespace kvferry::internal {

// ucp_ep_print_info of `ep` as text; empty if it cannot be captured.
std::string EndpointInfo(ucp_ep_h ep);

// Whether UCX maps the remote memory at `remote_address` into this process
// (ucp_rkey_ptr succeeds).
bool RkeyMapsRemoteMemory(ucp_rkey_h rkey, uint64_t remote_address);

struct DataPath {
  std::string name;       // a PeerInfo::data_path value (kvferry/transfer.h)
  bool emulated = false;  // put/get run as active messages the target must progress
  std::string transports;  // what carries it, e.g. "sysv" or "rc_mlx5,tcp"
};

// Classifies from the endpoint's printed lanes and whether every exported
// pool of the peer is mapped here (RkeyMapsRemoteMemory). Pure: tested on
// captured UCX output.
//   mapped                           -> shm-direct
//   an RMA lane on rc_*/dc_*         -> rdma
//   an RMA lane on cma/knem          -> shm-kernel-copy
//   an RMA lane on xpmem             -> shm-direct
//   no usable RMA lane, AM over tcp  -> tcp (emulated)
//   no usable RMA lane, AM otherwise -> am-emulated (emulated)
//   nothing parsed                   -> unknown
// RMA lanes on sysv/posix count only when mapped: those transports copy
// into a segment UCX allocated, and fall back to emulation for other memory.
DataPath ClassifyDataPath(absl::string_view endpoint_info, bool pools_mapped);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_DATA_PATH_H_
