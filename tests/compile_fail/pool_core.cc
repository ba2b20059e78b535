// Compile-fail case: a pool's shared state is not reachable.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  (void)o.pool->core();
}
