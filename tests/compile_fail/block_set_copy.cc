// Compile-fail case: a lease cannot be copied (it is move-only).
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::BlockSet copy(o.lease);
}
