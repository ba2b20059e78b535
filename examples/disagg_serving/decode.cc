// The decode worker: reserves blocks for each request, receives its prompt's
// KV cache from the prefill worker (READ on prefill's offer, layer by layer as
// prefill announces them; or, with --push, prefill WRITEs into blocks decode
// offered), verifies every byte, then "generates" the output: each token
// follows from the previous token's K row in its own cache, and its KV is
// appended to the cache, one more block whenever the last one is full.
#include <algorithm>
#include <cstdio>
#include <list>

#include "absl/flags/flag.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "examples/disagg_serving/flags.h"
#include "examples/disagg_serving/kv_math.h"
#include "examples/disagg_serving/worker.h"

namespace kvferry::serving {

Json TransferFigures(const std::vector<Transfer>& transfers) {
  std::vector<std::pair<absl::Time, absl::Time>> spans;
  uint64_t bytes = 0;
  for (const Transfer& t : transfers) {
    const TransferTelemetry tm = t.telemetry();
    if (tm.ended == absl::InfiniteFuture() || tm.posted == absl::InfinitePast()) continue;
    spans.emplace_back(tm.posted, tm.ended);
    bytes += tm.bytes;
  }
  if (spans.empty()) return nullptr;
  std::sort(spans.begin(), spans.end());
  absl::Duration busy;
  absl::Time begin = spans[0].first, end = spans[0].second;
  for (const auto& [b, e] : spans) {
    if (b > end) {
      busy += end - begin;
      begin = b;
    }
    end = std::max(end, e);
  }
  busy += end - begin;
  return {{"bytes", bytes}, {"busy_us", absl::ToInt64Microseconds(busy)}};
}

namespace {

struct Job {
  int64_t id = 0;
  std::string prefill;
  std::vector<uint32_t> tokens;
  uint32_t output_len = 0;
  std::string ticket;          // pull: prefill's offer
  std::vector<Transfer> reads;  // pull: one per announced layer range
  uint32_t layers_posted = 0;
  Offer offer;                 // push: decode's blocks, lent to prefill
};

class Decode {
 public:
  int Run() {
    if (absl::Status s = w_.Start("decode"); !s.ok()) {
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
      if (w_.router->closed()) return 3;
      Step();
      if (w_.DrainOverdue()) {
        while (!jobs_.empty()) Fail(jobs_.begin(), "handed back: draining for a reset", "handed_back");
      }
      if (w_.Tick(jobs_.size())) {
        w_.ResetNow(counters_);
        return 0;
      }
    }
  }

 private:
  std::list<Job>::iterator Find(int64_t id) {
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (it->id == id) return it;
    }
    return jobs_.end();
  }

  void Count(const std::string& what, int64_t n = 1) {
    counters_[what] = counters_.value(what, int64_t{0}) + n;
  }

  // Ends a job that will not complete: nothing of it may still move, its
  // blocks go back, and the router hears why.
  void Fail(std::list<Job>::iterator it, const std::string& why, const std::string& counter) {
    for (Transfer& t : it->reads) {
      if (t.state() == TransferState::kInFlight) t.Cancel().IgnoreError();
    }
    if (!it->offer.empty() && it->offer.state() == OfferState::kOpen) {
      it->offer.Revoke().IgnoreError();
    }
    Count(counter);
    w_.router->Send({{"type", "decode_failed"}, {"job", it->id}, {"error", why}});
    w_.blocks->Free(it->id);
    jobs_.erase(it);
  }

  bool Handle(const Json& m) {
    const std::string type = m["type"];
    if (type == "await") {
      absl::Status s = w_.AwaitPeers(m["names"]);
      w_.router->Send({{"type", "connected"}, {"ok", s.ok()}, {"error", s.ToString()}});
    } else if (type == "decode") {
      jobs_.push_back(Job{.id = m["job"], .prefill = m["prefill"],
                          .tokens = m["tokens"].get<std::vector<uint32_t>>(),
                          .output_len = m["output_len"]});
      auto it = std::prev(jobs_.end());
      auto b = w_.blocks->Allocate(it->id, BlocksFor(it->tokens.size(), w_.layout));
      if (!b.ok()) return Fail(it, b.status().ToString(), "errors"), true;
      if (absl::GetFlag(FLAGS_push)) {
        auto offer = w_.agent->Offer(**b, it->prefill,
                                     absl::Seconds(absl::GetFlag(FLAGS_offer_ttl_s)));
        if (!offer.ok()) return Fail(it, offer.status().ToString(), "errors"), true;
        it->offer = *std::move(offer);
        w_.router->Send({{"type", "offer"}, {"job", it->id},
                         {"ticket", absl::Base64Escape(it->offer.ticket())}});
      }
    } else if (type == "offer") {
      auto it = Find(m["job"]);
      if (it != jobs_.end()) absl::Base64Unescape(m["ticket"].get<std::string>(), &it->ticket);
    } else if (type == "layers") {
      auto it = Find(m["job"]);
      if (it == jobs_.end() || absl::GetFlag(FLAGS_push)) return true;
      const uint32_t begin = m["begin"], end = m["end"];
      auto t = w_.agent->PostTransfer({.op = TransferOp::kRead, .peer = it->prefill,
                                       .local = &w_.blocks->Blocks(it->id).front(),
                                       .layer_begin = begin, .layer_end = end,
                                       .offer_ticket = it->ticket});
      if (!t.ok()) return Fail(it, t.status().ToString(), "failed"), true;
      it->reads.push_back(*std::move(t));
      it->layers_posted = end;
    } else if (type == "abort") {
      auto it = Find(m["job"]);
      if (it != jobs_.end()) Fail(it, "aborted by the router", "aborted");
    } else if (type == "peer_gone") {  // the router saw that prefill worker die
      for (auto it = jobs_.begin(); it != jobs_.end();) {
        auto next = std::next(it);
        if (it->prefill == m["name"]) Fail(it, "its prefill worker is gone", "aborted");
        it = next;
      }
    } else if (type == "shutdown") {
      return false;
    }
    return true;
  }

  void Step() {
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      auto next = std::next(it);
      if (!it->offer.empty()) {  // push
        const OfferState s = it->offer.state();
        if (s == OfferState::kConsumed) {
          Complete(it);
        } else if (s != OfferState::kOpen) {
          Fail(it, it->offer.status().ToString(), "failed");
        }
      } else if (it->layers_posted == w_.layout.num_layers) {
        bool done = true, in_flight = false;
        std::string error;
        for (const Transfer& t : it->reads) {
          done &= t.state() == TransferState::kDone;
          in_flight |= t.state() == TransferState::kInFlight;
          if (t.state() == TransferState::kFailed || t.state() == TransferState::kCancelled) {
            error = t.status().ToString();
          }
        }
        if (done) {
          Complete(it);
        } else if (!error.empty() && !in_flight) {
          Fail(it, error, "failed");
        }
      }
      it = next;
    }
  }

  // The chunk of the job's block `index` (its list grows one block at a time).
  std::span<std::byte> Chunk(std::vector<BlockSet>& list, size_t index, uint32_t layer,
                             uint32_t plane) {
    for (const BlockSet& set : list) {
      if (index < set.size()) return set.Chunk(index, layer, plane);
      index -= set.size();
    }
    return {};
  }

  void Complete(std::list<Job>::iterator it) {
    const KvLayout& l = w_.layout;
    const int64_t kv_received_us = NowMicros();
    std::vector<BlockSet>& list = w_.blocks->Blocks(it->id);
    const uint32_t tpb = l.tokens_per_block;
    // Every received byte: prompt rows, and zeros past the prompt.
    const uint32_t prompt_blocks = BlocksFor(it->tokens.size(), l);
    uint64_t bad_rows = 0;
    std::vector<std::byte> scratch;
    for (uint32_t b = 0; b < prompt_blocks; ++b) {
      for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
        for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
          std::span<std::byte> chunk = Chunk(list, b, layer, plane);
          for (uint32_t slot = 0; slot < tpb; ++slot) {
            const uint64_t pos = uint64_t{b} * tpb + slot;
            const int64_t token = pos < it->tokens.size() ? int64_t{it->tokens[pos]} : -1;
            bad_rows += !CheckSlot(chunk, l, slot, token, layer, plane,
                                   static_cast<uint32_t>(pos), scratch);
          }
        }
      }
    }
    const int64_t verify_us = NowMicros() - kv_received_us;
    // Generate: read the previous token's K row (last layer, head 0) from the
    // cache, derive the next token, append its KV.
    std::vector<uint32_t> output;
    int64_t first_token_us = 0, last_token_us = 0;
    std::vector<int64_t> itl_us;  // between consecutive tokens
    uint32_t pos = static_cast<uint32_t>(it->tokens.size());
    uint32_t grown = 0;
    const uint32_t vocab = static_cast<uint32_t>(absl::GetFlag(FLAGS_vocab));
    for (uint32_t i = 0; i < it->output_len; ++i, ++pos) {
      const uint32_t prev = pos - 1;
      std::span<std::byte> k = Chunk(list, prev / tpb, l.num_layers - 1, 0);
      uint64_t word = 0;
      std::memcpy(&word, k.data() + uint64_t{prev % tpb} * l.num_kv_heads * RowBytes(l), 8);
      const uint32_t token = NextToken(word, vocab);
      output.push_back(token);
      const int64_t now = NowMicros();
      if (i == 0) {
        first_token_us = now;
      } else {
        itl_us.push_back(now - last_token_us);
      }
      last_token_us = now;
      if (pos / tpb >= prompt_blocks + grown) {
        if (!w_.blocks->Allocate(it->id, 1).ok()) {
          return Fail(it, "out of KV blocks while generating", "errors");
        }
        ++grown;
      }
      for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
        for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
          WriteSlot(Chunk(list, pos / tpb, layer, plane), l, pos % tpb, token, layer, plane, pos);
        }
      }
    }
    const uint64_t bytes = uint64_t{prompt_blocks} * l.block_bytes();
    Count("completed");
    Count("bytes_received", static_cast<int64_t>(bytes));
    Count("bad_rows", static_cast<int64_t>(bad_rows));
    w_.router->Send({{"type", "done"},
                     {"job", it->id},
                     {"output", output},
                     {"bad_rows", bad_rows},
                     {"bytes", bytes},
                     {"blocks", prompt_blocks + grown},
                     {"kv_received_us", kv_received_us},
                     {"verify_us", verify_us},
                     {"first_token_us", first_token_us},
                     {"last_token_us", last_token_us},
                     {"itl_us", itl_us},
                     {"transfer", TransferFigures(it->reads)}});
    w_.blocks->Free(it->id);  // the request ended: its blocks go back
    jobs_.erase(it);
  }

  int Finish() {
    while (!jobs_.empty()) Fail(jobs_.begin(), "shut down", "abandoned");
    w_.Report(counters_);
    w_.Stop();
    return 0;
  }

  WorkerBase w_;
  std::list<Job> jobs_;
  Json counters_ = Json::object();
};

}  // namespace

int RunDecode() { return Decode().Run(); }

}  // namespace kvferry::serving
