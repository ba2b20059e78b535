// Compile-fail case: a transfer handle cannot be copied (it is move-only).
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::Transfer copy(o.transfer);
}
