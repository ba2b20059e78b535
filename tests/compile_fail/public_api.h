// What every compile-fail case starts from: the public headers, as a consumer
// of an installed kvferry sees them (src/ is not on the include path), and a
// few objects obtained the legal way. Each case adds one line that must not
// compile; ok_public_routes.cc is the control that must.
#ifndef KVFERRY_TESTS_COMPILE_FAIL_PUBLIC_API_H_
#define KVFERRY_TESTS_COMPILE_FAIL_PUBLIC_API_H_

#include <memory>
#include <utility>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "kvferry/agent.h"
#include "kvferry/kv_pool.h"
#include "kvferry/ledger.h"
#include "kvferry/transfer.h"

namespace cf {

struct Objects {
  std::unique_ptr<kvferry::Agent> agent;
  kvferry::KvPool* pool = nullptr;
  kvferry::BlockSet lease;
  kvferry::Transfer transfer;
};

// Never run: the cases are only compiled.
inline Objects Make() {
  Objects o;
  o.agent = std::move(*kvferry::Agent::Create({}));
  o.pool = *o.agent->CreatePool("kv", kvferry::KvLayout{});
  o.lease = std::move(*o.pool->Lease(1));
  return o;
}

}  // namespace cf

#endif  // KVFERRY_TESTS_COMPILE_FAIL_PUBLIC_API_H_
