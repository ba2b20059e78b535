// The control: the same harness and command as the compile-fail cases, using
// only legal public routes. It must compile, which shows that the failures of
// the other cases come from the line each adds, not from the harness.
#include "public_api.h"

void Case() {
  cf::Objects o = cf::Make();
  (void)o.agent->name();
  (void)o.pool->free_blocks();
  (void)o.lease.Chunk(0, 0, 0);
  kvferry::Offer offer = std::move(*o.agent->Offer(o.lease, "decode", absl::Seconds(1)));
  kvferry::Offer offer_moved = std::move(offer);
  (void)offer_moved.ticket();
  kvferry::BlockSet moved = std::move(o.lease);
  moved.Reset();
  kvferry::Transfer t = std::move(o.transfer);
  (void)t.state();
  const kvferry::Ledger& ledger = o.agent->ledger();
  (void)ledger.Snapshot().TotalLive();
  (void)ledger.Report();
}
