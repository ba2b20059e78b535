// Compile-fail case: no reference-count hook of a transfer is declared.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::internal::TransferCore* p = nullptr;
  kvferry::internal::intrusive_ptr_add_ref(p);
}
