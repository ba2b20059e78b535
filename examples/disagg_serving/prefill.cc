// The prefill worker: "computes" each request's KV cache layer by layer into
// blocks of its engine-owned pool, and hands them to the decode worker the
// router chose: by default it offers them (Agent::Offer) and decode READs
// them layer by layer as the "layers" messages arrive; with --push it WRITEs
// each layer into the blocks decode offered.
#include <cstdio>
#include <list>

#include "absl/flags/flag.h"
#include "absl/strings/escaping.h"
#include "absl/time/clock.h"
#include "examples/disagg_serving/flags.h"
#include "examples/disagg_serving/kv_math.h"
#include "examples/disagg_serving/worker.h"

namespace kvferry::serving {
namespace {

void ComputeLayer(const BlockSet& blocks, const std::vector<uint32_t>& tokens, uint32_t layer,
                  const KvLayout& l) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
      std::span<std::byte> chunk = blocks.Chunk(i, layer, plane);
      for (uint32_t slot = 0; slot < l.tokens_per_block; ++slot) {
        const uint64_t pos = i * l.tokens_per_block + slot;
        const int64_t token = pos < tokens.size() ? int64_t{tokens[pos]} : -1;
        WriteSlot(chunk, l, slot, token, layer, plane, static_cast<uint32_t>(pos));
      }
    }
  }
}

// The simulated cost of one layer's forward pass for `tokens` tokens.
void Think(size_t tokens) {
  const double ms = absl::GetFlag(FLAGS_prefill_ms_per_layer) * static_cast<double>(tokens) / 512;
  if (ms > 0) absl::SleepFor(absl::Microseconds(static_cast<int64_t>(ms * 1000)));
}

struct Job {
  int64_t id = 0;
  std::string decode;
  std::vector<uint32_t> tokens;
  // Pull: the offer holds the blocks until decode consumed it (or it ended).
  Offer offer;
  // Push: own blocks, decode's ticket, and the WRITEs posted with it.
  BlockSet* blocks = nullptr;
  std::string ticket;
  std::vector<Transfer> writes;
  bool written = false;  // every layer posted
};

class Prefill {
 public:
  int Run() {
    if (absl::Status s = w_.Start("prefill"); !s.ok()) {
      std::fprintf(stderr, "kvferry_serve[%s]: start: %s\n", absl::GetFlag(FLAGS_name).c_str(),
                   s.ToString().c_str());
      w_.router->Send({{"type", "fatal"}, {"error", s.ToString()}});
      w_.router->Drain(absl::Seconds(5));
      return 1;
    }
    while (true) {
      for (Json& m : w_.router->Wait(absl::Milliseconds(2))) {
        if (w_.HandleControl(m)) continue;
        if (!Handle(m)) return Finish();
      }
      if (w_.router->closed()) return 3;  // the router is gone
      Step();
      if (w_.DrainOverdue()) Abandon();
      if (w_.Tick(jobs_.size())) {
        w_.ResetNow(counters_);
        return 0;
      }
    }
  }

 private:
  void End(std::list<Job>::iterator it, const std::string& outcome) {
    counters_[outcome] = counters_.value(outcome, 0) + 1;
    // With --push the WRITEs are this side's: their figures go along.
    w_.router->Send({{"type", "prefill_end"}, {"job", it->id}, {"outcome", outcome},
                     {"transfer", TransferFigures(it->writes)}});
    w_.blocks->Free(it->id);
    jobs_.erase(it);
  }

  // How a job whose offer or WRITE could not even be posted ends: the peer
  // failed (or is gone), or something else went wrong.
  std::string PostFailure(const std::string& peer) {
    auto info = w_.agent->GetPeer(peer);
    if (!info.ok() || info->state == PeerState::kFailed || info->state == PeerState::kClosed) {
      return "peer-failed";
    }
    return "error";
  }

  bool Handle(const Json& m) {
    const std::string type = m["type"];
    if (type == "connect") {
      absl::Status s = w_.ConnectPeers(m["peers"]);
      w_.router->Send({{"type", "connected"}, {"ok", s.ok()}, {"error", s.ToString()}});
    } else if (type == "prefill") {
      jobs_.push_back(Job{.id = m["job"], .decode = m["decode"],
                          .tokens = m["tokens"].get<std::vector<uint32_t>>()});
      auto it = std::prev(jobs_.end());
      if (absl::GetFlag(FLAGS_push)) {
        auto b = w_.blocks->Allocate(it->id, BlocksFor(it->tokens.size(), w_.layout));
        if (b.ok()) {
          it->blocks = *b;
        } else {
          End(it, "error");
        }
      } else {
        ComputeAndOffer(it);
      }
    } else if (type == "offer") {  // --push: decode's blocks, to WRITE into
      for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
        if (it->id == m["job"]) {
          absl::Base64Unescape(m["ticket"].get<std::string>(), &it->ticket);
          ComputeAndWrite(it);
          break;
        }
      }
    } else if (type == "abort") {  // decode gave up on the job: end it now
      for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
        if (it->id != m["job"]) continue;
        if (!it->offer.empty()) {
          it->offer.Revoke().IgnoreError();  // Step() reports how it ended
        } else {
          for (Transfer& t : it->writes) t.Cancel().IgnoreError();
          if (!it->written) End(it, "aborted");
        }
        break;
      }
    } else if (type == "peer_gone") {  // the router saw that decode worker die
      for (auto it = jobs_.begin(); it != jobs_.end();) {
        auto next = std::next(it);
        if (it->decode == m["name"]) {
          if (!it->offer.empty()) it->offer.Revoke().IgnoreError();
          for (Transfer& t : it->writes) t.Cancel().IgnoreError();
          End(it, "peer-failed");
        }
        it = next;
      }
    } else if (type == "shutdown") {
      return false;
    }
    return true;
  }

  void ComputeAndOffer(std::list<Job>::iterator it) {
    const KvLayout& l = w_.layout;
    auto b = w_.blocks->Allocate(it->id, BlocksFor(it->tokens.size(), l));
    if (!b.ok()) return End(it, "error");
    const bool pipeline = absl::GetFlag(FLAGS_pipeline);
    auto announce = [&]() -> bool {
      auto offer = w_.agent->Offer(**b, it->decode,
                                   absl::Seconds(absl::GetFlag(FLAGS_offer_ttl_s)));
      if (!offer.ok()) return false;
      it->offer = *std::move(offer);
      w_.router->Send({{"type", "offer"}, {"job", it->id},
                       {"ticket", absl::Base64Escape(it->offer.ticket())}});
      return true;
    };
    if (pipeline && !announce()) return End(it, PostFailure(it->decode));
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      Think(it->tokens.size());
      ComputeLayer(**b, it->tokens, layer, l);
      if (pipeline) {
        w_.router->Send({{"type", "layers"}, {"job", it->id}, {"begin", layer}, {"end", layer + 1}});
      }
    }
    if (!pipeline) {
      if (!announce()) return End(it, PostFailure(it->decode));
      w_.router->Send({{"type", "layers"}, {"job", it->id}, {"begin", 0}, {"end", l.num_layers}});
    }
    // The offer holds its own lease: the blocks go back when it ends.
    w_.blocks->Free(it->id);
  }

  void ComputeAndWrite(std::list<Job>::iterator it) {
    const KvLayout& l = w_.layout;
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      Think(it->tokens.size());
      ComputeLayer(*it->blocks, it->tokens, layer, l);
      auto t = w_.agent->PostTransfer({.op = TransferOp::kWrite, .peer = it->decode,
                                       .local = it->blocks, .layer_begin = layer,
                                       .layer_end = layer + 1, .offer_ticket = it->ticket});
      if (!t.ok()) {
        // Writes already posted end first (Step reports the job then).
        for (Transfer& w : it->writes) w.Cancel().IgnoreError();
        if (it->writes.empty()) return End(it, PostFailure(it->decode));
        it->written = true;
        return;
      }
      it->writes.push_back(*std::move(t));
      w_.router->Send({{"type", "layers"}, {"job", it->id}, {"begin", layer}, {"end", layer + 1}});
    }
    it->written = true;
  }

  void Step() {
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      auto next = std::next(it);
      if (!it->offer.empty()) {
        if (it->offer.state() != OfferState::kOpen) End(it, OfferStateName(it->offer.state()));
      } else if (it->written) {
        bool done = true, failed = false;
        for (const Transfer& t : it->writes) {
          done &= t.state() == TransferState::kDone;
          failed |= t.state() == TransferState::kFailed || t.state() == TransferState::kCancelled;
        }
        if (failed) {
          bool all_ended = true;
          for (const Transfer& t : it->writes) all_ended &= t.state() != TransferState::kInFlight;
          if (all_ended) End(it, "write-failed");
        } else if (done) {
          End(it, "written");
        }
      }
      it = next;
    }
  }

  // Ends every job now: its offer revoked, its writes cancelled.
  void Abandon() {
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      auto next = std::next(it);
      if (!it->offer.empty()) it->offer.Revoke().IgnoreError();
      for (Transfer& t : it->writes) t.Cancel().IgnoreError();
      End(it, "abandoned");
      it = next;
    }
  }

  int Finish() {
    // Every offer ends by itself (consumed, or its peer failed); give them time.
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (!jobs_.empty() && absl::Now() < deadline) {
      w_.Heartbeat();
      Step();
      absl::SleepFor(absl::Milliseconds(5));
    }
    Abandon();
    w_.Report(counters_);
    w_.Stop();
    return 0;
  }

  WorkerBase w_;
  std::list<Job> jobs_;
  Json counters_ = Json::object();
};

}  // namespace

int RunPrefill() { return Prefill().Run(); }

}  // namespace kvferry::serving
