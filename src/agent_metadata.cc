// AgentImpl: connection metadata as bytes (Agent::LocalMetadata,
// Agent::ConnectFromMetadata), for engines that exchange it over their own
// channel.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/metadata.h"
#include "src/status_macros.h"

namespace kvferry::internal {

absl::StatusOr<std::string> AgentImpl::LocalMetadata(const std::string& advertise) const {
  ControlLock l(this);
  if (!listen_fd_.valid()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "agent '", options_.name, "' does not listen: call Listen before LocalMetadata"));
  }
  const std::string host = advertise.empty() ? listen_host_ : advertise;
  KVFERRY_ASSIGN_OR_RETURN(SocketAddress parsed, ParseSocketAddress(host, listen_port_));
  if (parsed.IsWildcard()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "agent '", options_.name, "' listens on the wildcard address ", host,
        ": pass the address peers should connect to (advertise_address)"));
  }
  if (host.size() > kMaxMetadataAddressBytes) {
    return absl::InvalidArgumentError(absl::StrCat("address '", host, "' is longer than ",
                                                   kMaxMetadataAddressBytes, " bytes"));
  }
  return EncodeMetadata({.wire_version = wire::kVersion,
                         .name = options_.name,
                         .incarnation = incarnation_,
                         .addresses = {{host, listen_port_}}});
}

absl::StatusOr<PeerInfo> AgentImpl::ConnectFromMetadata(absl::string_view metadata,
                                                        absl::Duration timeout) {
  KVFERRY_ASSIGN_OR_RETURN(AgentMetadata m, ParseMetadata(metadata));
  if (m.name == options_.name) {
    return absl::InvalidArgumentError(
        absl::StrCat("the metadata names this agent ('", m.name, "')"));
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status last;
  for (const auto& [address, port] : m.addresses) {
    absl::StatusOr<PeerInfo> got =
        Connect(address, port, std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!got.ok()) {
      last = got.status();
      if (absl::IsAlreadyExists(last) || absl::IsUnauthenticated(last) ||
          absl::IsFailedPrecondition(last)) {
        return last;  // it reached an agent: another address would reach the same
      }
      continue;
    }
    if (got->name != m.name) {
      // Authenticated, but another agent than the metadata names.
      Disconnect(got->name).IgnoreError();
      return absl::FailedPreconditionError(absl::StrCat(
          "the metadata names agent '", m.name, "', but ", address, ":", port, " is agent '",
          got->name, "' (disconnected)"));
    }
    return got;
  }
  return last;
}

}  // namespace kvferry::internal

namespace kvferry {

absl::StatusOr<std::string> Agent::LocalMetadata(const std::string& advertise_address) const {
  return impl_->LocalMetadata(advertise_address);
}

absl::StatusOr<PeerInfo> Agent::ConnectFromMetadata(absl::string_view metadata,
                                                    absl::Duration timeout) {
  return impl_->ConnectFromMetadata(metadata, timeout);
}

}  // namespace kvferry
