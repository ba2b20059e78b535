// The UCX transports that in-process tests run over, as a test parameter:
// shared memory (with TCP for the wireup) and TCP alone.
#ifndef KVFERRY_TESTS_TRANSPORTS_H_
#define KVFERRY_TESTS_TRANSPORTS_H_

#include <ostream>
#include <string>

#include <gtest/gtest.h>

#include "kvferry/agent.h"

namespace kvferry::test {

struct Transport {
  const char* name;  // the test name suffix
  const char* tls;   // UCX_TLS
};
inline void PrintTo(const Transport& t, std::ostream* os) { *os << t.name; }

inline constexpr Transport kShm{"shm", "posix,sysv,tcp"};
inline constexpr Transport kTcp{"tcp", "tcp"};

inline std::string TransportName(const ::testing::TestParamInfo<Transport>& info) {
  return info.param.name;
}

// What every in-process test agent runs with: survivors abort the test
// (LeakPolicy::kAbort), UCX restricted to `transport`.
inline AgentOptions TestAgentOptions(const std::string& name, const Transport& transport) {
  AgentOptions o;
  o.name = name;
  o.leak_policy = LeakPolicy::kAbort;
  o.ucx_config = {{"TLS", transport.tls}};
  return o;
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_TRANSPORTS_H_
