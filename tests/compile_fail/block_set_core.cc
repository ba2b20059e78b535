// Compile-fail case: a lease's shared state is not reachable.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  (void)o.lease.core();
}
