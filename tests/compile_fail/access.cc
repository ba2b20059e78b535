// Compile-fail case: the library's access class is not defined for users.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  (void)kvferry::internal::Access::Pool(*o.pool);
}
