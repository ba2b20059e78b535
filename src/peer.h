// internal::Peer: a remote agent as this agent knows it. Owns the control
// endpoint (client/server connection, UCX peer-error mode: handshake,
// notifications, pings), the data endpoint (to the peer's worker address; the
// error mode depends on where the peer is, see AgentOptions), the remote keys
// of the peer's exported pools, and the control messages in flight.
//
// Every field is guarded by the owning AgentImpl's mu_ (one lock for the
// whole worker; clang's analysis cannot name it from here). Reference counts
// are thread-safe because in-flight transfers hold their peer.
#ifndef KVFERRY_SRC_PEER_H_
#define KVFERRY_SRC_PEER_H_

#include <memory>
#include <string>
#include <vector>

#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvferry/transfer.h"
#include "src/tracked.h"
#include "src/ucx/endpoint.h"
#include "src/wire/message.h"

namespace kvferry::internal {

struct PendingSend {
  std::unique_ptr<std::string> bytes;  // stable address until the send completes
  Request request;
};

struct RemotePool {
  wire::PoolDescriptor desc;
  RemoteKey rkey;  // unpacked on the data endpoint
};

class Peer : public boost::intrusive_ref_counter<Peer> {
 public:
  explicit Peer(Tracked tracked) : tracked_(std::move(tracked)) {}
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  const RemotePool* FindPool(absl::string_view pool_name) const {
    for (const RemotePool& p : pools) {
      if (p.desc.name == pool_name) return &p;
    }
    return nullptr;
  }
  PeerInfo Info() const;

  std::string name;  // empty until the handshake names it (server side)
  bool is_client = false;  // we connected to it
  PeerState state = PeerState::kHandshaking;
  absl::Status status;
  bool same_host = false;
  bool data_peer_mode = false;
  EndpointPtr control;
  EndpointPtr data;
  // Set when the data endpoint was closed such that no operation posted on
  // it can still move (drained, or force-closed).
  bool data_fenced = false;
  // Destroyed before `data` is released (member order does not matter: each
  // RemoteKey holds its endpoint).
  std::vector<RemotePool> pools;
  std::vector<PendingSend> sends;  // control messages in flight
  absl::Time last_heard;
  absl::Time last_ping;
  int transfers_in_flight = 0;

 private:
  Tracked tracked_;
};

using PeerPtr = boost::intrusive_ptr<Peer>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_PEER_H_
