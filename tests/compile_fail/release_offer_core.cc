// Compile-fail case: no reference-count hook of an offer is declared.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::internal::OfferCore* p = nullptr;
  kvferry::internal::intrusive_ptr_release(p);
}
