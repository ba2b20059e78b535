// Compile-fail case: only the agent constructs a KvPool.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::KvPool extra(nullptr);
}
