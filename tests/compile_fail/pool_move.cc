// Compile-fail case: a pool cannot be moved out of its agent.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::KvPool moved(std::move(*o.pool));
}
