// Compile-fail case: a pool cannot be copied.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::KvPool copy(*o.pool);
}
