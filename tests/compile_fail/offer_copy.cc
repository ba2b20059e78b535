// Compile-fail case: an offer handle cannot be copied (it is move-only).
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  kvferry::Offer offer = std::move(*o.agent->Offer(o.lease, "decode", absl::Seconds(1)));
  kvferry::Offer copy(offer);
}
