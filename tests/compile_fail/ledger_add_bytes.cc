// Compile-fail case: only the library counts registered bytes.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  const_cast<kvferry::Ledger&>(o.agent->ledger()).AddRegisteredBytes(1);
}
