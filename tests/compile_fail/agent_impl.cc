// Compile-fail case: the agent's implementation is not reachable.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  (void)o.agent->impl();
}
