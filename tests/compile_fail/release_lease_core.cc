// Compile-fail case: no reference-count hook of a lease is found, not even by argument-dependent lookup.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::internal::LeaseCore* p = nullptr;
  intrusive_ptr_release(p);
}
