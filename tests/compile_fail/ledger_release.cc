// Compile-fail case: a ledger cannot be released by hand.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  intrusive_ptr_release(&o.agent->ledger());
}
