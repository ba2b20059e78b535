// Compile-fail case: only the library destroys a Ledger.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  delete &o.agent->ledger();
}
