// Compile-fail case: only the library constructs a Ledger.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::Ledger mine("mine");
}
