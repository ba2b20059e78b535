// Compile-fail case: a ledger cannot be retained through boost::intrusive_ptr.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  boost::intrusive_ptr<const kvferry::Ledger> keep(&o.agent->ledger());
}
