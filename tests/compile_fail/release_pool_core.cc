// Compile-fail case: no reference-count hook of a pool is declared.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::internal::PoolCore* p = nullptr;
  kvferry::internal::intrusive_ptr_release(p);
}
