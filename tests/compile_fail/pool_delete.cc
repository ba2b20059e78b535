// Compile-fail case: only the agent destroys its pools.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  delete o.pool;
}
