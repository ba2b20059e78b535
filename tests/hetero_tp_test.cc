// Heterogeneous tensor parallelism (TransferSpec::slice_bytes and the slice
// offsets, KvLayout::CheckHeadSliced): prefill ranks in other processes
// (kvferry_test_peer --heads) hold their heads of one whole cache; decode
// ranks here pull theirs. Prefill TP 1 -> decode TP 2 and TP 4 (each decode
// rank reads its head slice of every remote chunk), prefill TP 2 -> decode
// TP 1 (one decode gathers both prefill ranks' chunks into slot ranges of
// its own), each checked byte for byte against the whole cache. Layouts that
// are not head-sliced peers, and slices that do not fit, are refused naming
// the mismatch.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "src/transfer_plan.h"
#include "tests/child_process.h"
#include "tests/test_util.h"
#include "tests/tp_pattern.h"

namespace kvferry::test {
namespace {

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;
constexpr uint32_t kModelHeads = 4;  // KV heads of the whole model
constexpr uint64_t kSeed = 11;
constexpr uint32_t kDecodeBlocks = 16;
// Remote blocks (the peer holds 32), paired with local 0..5: a run, a
// reversal and a gap, so both runs and single blocks are planned.
const std::vector<uint32_t> kRemote = {5, 6, 7, 20, 19, 30};

struct TpCase {
  const char* name;
  const char* tls;
};
void PrintTo(const TpCase& c, std::ostream* os) { *os << c.name; }

// A prefill rank: kvferry_test_peer serving 32 blocks of `heads` heads from
// `first_head` of the whole cache.
struct PrefillRank {
  std::unique_ptr<ChildProcess> child;
  uint16_t port = 0;
};

class HeteroTpTest : public ::testing::TestWithParam<TpCase> {
 protected:
  void StartPrefill(const std::string& name, uint32_t heads, uint32_t first_head,
                    PrefillRank* rank) {
    rank->child = std::make_unique<ChildProcess>(std::vector<std::string>{
        kPeerBinary, "--role=prefill-serve", "--name=" + name,
        absl::StrCat("--tls=", GetParam().tls), absl::StrCat("--seed=", kSeed),
        absl::StrCat("--heads=", heads), absl::StrCat("--first_head=", first_head),
        absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))});
    ASSERT_TRUE(rank->child->started());
    std::optional<std::string> line = rank->child->ReadUntil("PORT");
    uint32_t port = 0;
    ASSERT_TRUE(line && absl::SimpleAtoi(line->substr(5), &port)) << line.value_or("(eof)");
    rank->port = static_cast<uint16_t>(port);
  }
  // A decode rank here: an agent with pool "kv" of `heads` heads.
  std::unique_ptr<Agent> StartDecode(const std::string& name, uint32_t heads) {
    AgentOptions o;
    o.name = name;
    o.leak_policy = LeakPolicy::kAbort;
    o.peer_timeout = kPeerTimeout;
    o.ucx_config = {{"TLS", GetParam().tls}};
    auto agent = Agent::Create(o);
    EXPECT_THAT(agent, IsOk());
    if (!agent.ok()) return nullptr;
    EXPECT_THAT((*agent)->CreatePool("kv", HeadLayout(kDecodeBlocks, heads)), IsOk());
    return *std::move(agent);
  }
  static std::vector<uint32_t> Local() {
    std::vector<uint32_t> ids;
    for (uint32_t i = 0; i < kRemote.size(); ++i) ids.push_back(i);
    return ids;
  }
  // Every byte of local blocks 0.. at [offset, offset + bytes) of each
  // chunk against heads [first_head, ...) of the whole cache's kRemote.
  void ExpectHeads(Agent& agent, uint64_t offset, uint64_t bytes, uint32_t first_head) {
    KvPool* pool = agent.FindPool("kv");
    ASSERT_NE(pool, nullptr);
    auto blocks = pool->LeaseIds(Local());
    ASSERT_THAT(blocks, IsOk());
    const KvLayout& l = pool->layout();
    for (size_t i = 0; i < kRemote.size(); ++i) {
      for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
        for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
          const std::span<std::byte> chunk = blocks->Chunk(i, layer, plane);
          ASSERT_LE(offset + bytes, chunk.size());
          EXPECT_EQ(FirstWrongByte(chunk.data() + offset, bytes, l.head_bytes(), first_head,
                                   kSeed, kRemote[i], layer, plane),
                    -1)
              << agent.name() << ": block " << i << " (remote " << kRemote[i] << ") layer "
              << layer << " plane " << plane << " bytes [" << offset << ", +" << bytes << ")";
        }
      }
    }
  }
};

// Prefill TP 1 -> decode TP 2 and TP 4: decode rank r of ratio R reads heads
// [r * 4 / R, +4 / R) of each remote chunk: slice_bytes its own chunk,
// remote_slice_offset (r % R) times that.
TEST_P(HeteroTpTest, DecodeRanksPullTheirHeadsFromOnePrefill) {
  PrefillRank prefill;
  ASSERT_NO_FATAL_FAILURE(StartPrefill("prefill", kModelHeads, 0, &prefill));
  for (uint32_t ratio : {2u, 4u}) {
    const uint32_t heads = kModelHeads / ratio;
    std::vector<std::unique_ptr<Agent>> ranks;
    std::vector<Transfer> transfers;
    for (uint32_t r = 0; r < ratio; ++r) {
      ranks.push_back(StartDecode(absl::StrCat("decode-tp", ratio, "-", r), heads));
      ASSERT_NE(ranks.back(), nullptr);
      Agent& decode = *ranks.back();
      ASSERT_THAT(decode.Connect("127.0.0.1", prefill.port), IsOk());
      const uint64_t chunk = HeadLayout(1, heads).chunk_bytes();
      const std::vector<uint32_t> local = Local();
      auto t = decode.PostTransfer({.op = TransferOp::kRead, .peer = "prefill",
                                    .local_pool = "kv", .local_blocks = local,
                                    .remote_ids = kRemote, .slice_bytes = chunk,
                                    .remote_slice_offset = (r % ratio) * chunk});
      ASSERT_THAT(t, IsOk()) << decode.name();
      transfers.push_back(*std::move(t));
    }
    for (uint32_t r = 0; r < ratio; ++r) {
      ASSERT_THAT(transfers[r].Wait(absl::Seconds(60)), IsOk());
      ExpectHeads(*ranks[r], 0, HeadLayout(1, heads).chunk_bytes(), r * heads);
    }
  }
}

// Prefill TP 2 -> decode TP 1: one decode reads each prefill rank's whole
// chunk into its slot range of the local chunk (local_slice_offset).
TEST_P(HeteroTpTest, OneDecodeGathersFromTwoPrefillRanks) {
  PrefillRank rank0, rank1;
  ASSERT_NO_FATAL_FAILURE(StartPrefill("prefill-0", kModelHeads / 2, 0, &rank0));
  ASSERT_NO_FATAL_FAILURE(StartPrefill("prefill-1", kModelHeads / 2, kModelHeads / 2, &rank1));
  std::unique_ptr<Agent> decode = StartDecode("decode", kModelHeads);
  ASSERT_NE(decode, nullptr);
  ASSERT_THAT(decode->Connect("127.0.0.1", rank0.port), IsOk());
  ASSERT_THAT(decode->Connect("127.0.0.1", rank1.port), IsOk());
  const uint64_t half = HeadLayout(1, kModelHeads / 2).chunk_bytes();
  std::vector<Transfer> transfers;
  const std::vector<uint32_t> local = Local();
  for (uint32_t r = 0; r < 2; ++r) {
    auto t = decode->PostTransfer({.op = TransferOp::kRead,
                                   .peer = absl::StrCat("prefill-", r), .local_pool = "kv",
                                   .local_blocks = local, .remote_ids = kRemote,
                                   .slice_bytes = half, .local_slice_offset = r * half});
    ASSERT_THAT(t, IsOk());
    transfers.push_back(*std::move(t));
  }
  for (Transfer& t : transfers) ASSERT_THAT(t.Wait(absl::Seconds(60)), IsOk());
  // The whole chunk, both halves: every head of the model.
  ExpectHeads(*decode, 0, 2 * half, 0);
  EXPECT_EQ(decode->FindPool("kv")->busy_blocks(), 0u);
}

// What is not a head-sliced peer, and slices that do not fit.
TEST_P(HeteroTpTest, MismatchesAreRefusedNamingThem) {
  // Heads 3 against 2: no integer ratio, so the handshake refuses the peer
  // (the refusal is the listener's, so its "here" is the peer's side).
  {
    PrefillRank odd;
    ASSERT_NO_FATAL_FAILURE(StartPrefill("prefill-odd", 3, 0, &odd));
    std::unique_ptr<Agent> decode = StartDecode("decode-odd", 2);
    ASSERT_NE(decode, nullptr);
    EXPECT_THAT(decode->Connect("127.0.0.1", odd.port),
                StatusIs(absl::StatusCode::kFailedPrecondition,
                         "num_kv_heads is 3 here but 2 on the peer, which is no integer"));
  }
  PrefillRank prefill;
  ASSERT_NO_FATAL_FAILURE(StartPrefill("prefill", kModelHeads, 0, &prefill));
  std::unique_ptr<Agent> decode = StartDecode("decode", 2);
  ASSERT_NE(decode, nullptr);
  ASSERT_THAT(decode->Connect("127.0.0.1", prefill.port), IsOk());
  const uint64_t head = HeadLayout(1, 1).head_bytes();
  const std::vector<uint32_t> local = {0, 1};
  const std::vector<uint32_t> remote = {2, 3};
  auto post = [&](TransferSpec spec) {
    spec.op = TransferOp::kRead;
    spec.peer = "prefill";
    if (spec.local_pool.empty()) spec.local_pool = "kv";
    spec.local_blocks = local;
    spec.remote_ids = remote;
    return decode->PostTransfer(spec).status();
  };
  // Whole chunks between head-sliced pools: refused, with the hint.
  EXPECT_THAT(post({}), StatusIs(absl::StatusCode::kFailedPrecondition,
                                 "name the heads with TransferSpec.slice_bytes"));
  EXPECT_THAT(post({.slice_bytes = head + 64}),
              StatusIs(absl::StatusCode::kInvalidArgument, "must be whole heads"));
  EXPECT_THAT(post({.slice_bytes = 2 * head, .remote_slice_offset = 3 * head}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       absl::StrCat("remote_slice_offset ", 3 * head, " + slice_bytes ",
                                    2 * head, " is past the ", 4 * head,
                                    "-byte chunk of peer pool 'kv'")));
  EXPECT_THAT(post({.slice_bytes = 2 * head, .local_slice_offset = head}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       absl::StrCat("is past the ", 2 * head, "-byte chunk of local pool 'kv'")));
  EXPECT_THAT(post({.remote_slice_offset = head}),
              StatusIs(absl::StatusCode::kInvalidArgument, "without slice_bytes"));
  // Another head_dim: not the same model.
  KvLayout other = HeadLayout(kDecodeBlocks, 2);
  other.head_dim = 32;
  ASSERT_THAT(decode->CreatePool("narrow", other, /*exported=*/false), IsOk());
  EXPECT_THAT(post({.remote_pool = "kv", .local_pool = "narrow", .slice_bytes = other.chunk_bytes()}),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "head_dim is 32 here but 64 on the peer"));
  // Nothing was left behind by the refusals.
  EXPECT_EQ(decode->GetStats().Live(ResourceKind::kTransfer), 0);
  EXPECT_EQ(decode->FindPool("kv")->busy_blocks(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Paths, HeteroTpTest,
                         ::testing::Values(TpCase{"shm", "posix,sysv,tcp"},
                                           TpCase{"tcp", "tcp"}),
                         [](const auto& c) { return std::string(c.param.name); });

// The plan of a slice: one copy per block at each side's offset; a slice
// as wide as both chunks still coalesces runs.
TEST(HeadSlicePlanTest, SlicesPlanOneCopyPerBlockAtEachSidesOffset) {
  const KvLayout decode = HeadLayout(8, 1);   // 2 KiB chunks
  const KvLayout prefill = HeadLayout(8, 4);  // 8 KiB chunks
  const std::vector<uint32_t> local = {0, 1};
  const std::vector<uint32_t> remote = {4, 5};
  const uint64_t c = decode.chunk_bytes();
  auto ops = internal::PlanCopies(decode, 1, prefill, 1, local, remote, 0, 1,
                                  {.local_offset = 0, .remote_offset = 2 * c, .bytes = c});
  ASSERT_EQ(ops.size(), 2u * 2u);  // two blocks, K and V
  EXPECT_EQ(ops[0], (internal::CopyOp{0, decode.Offset(0, 0, 0), 0,
                                      prefill.Offset(0, 0, 4) + 2 * c, c}));
  EXPECT_EQ(ops[1], (internal::CopyOp{0, decode.Offset(0, 0, 1), 0,
                                      prefill.Offset(0, 0, 5) + 2 * c, c}));
  // Equal chunks, a full-width slice: the run of two is one copy per plane.
  auto whole = internal::PlanCopies(decode, 1, decode, 1, local, remote, 0, 1,
                                    {.local_offset = 0, .remote_offset = 0, .bytes = c});
  ASSERT_EQ(whole.size(), 2u);
  EXPECT_EQ(whole[0].bytes, 2 * c);
}

TEST(HeadSlicePlanTest, CheckHeadSlicedAcceptsIntegerRatiosOnly) {
  EXPECT_THAT(HeadLayout(8, 2).CheckHeadSliced(HeadLayout(16, 8)), IsOk());
  EXPECT_THAT(HeadLayout(8, 8).CheckHeadSliced(HeadLayout(16, 2)), IsOk());
  EXPECT_THAT(HeadLayout(8, 4).CheckHeadSliced(HeadLayout(8, 4)), IsOk());
  EXPECT_THAT(HeadLayout(8, 4).CheckHeadSliced(HeadLayout(8, 6)),
              StatusIs(absl::StatusCode::kFailedPrecondition, "no integer tensor-parallel ratio"));
  KvLayout layers = HeadLayout(8, 2);
  layers.num_layers = 3;
  EXPECT_THAT(HeadLayout(8, 4).CheckHeadSliced(layers),
              StatusIs(absl::StatusCode::kFailedPrecondition, "num_layers is 4 here but 3"));
  KvLayout tokens = HeadLayout(8, 2);
  tokens.tokens_per_block = 32;
  EXPECT_THAT(HeadLayout(8, 4).CheckHeadSliced(tokens),
              StatusIs(absl::StatusCode::kFailedPrecondition, "tokens_per_block"));
  KvLayout mla = HeadLayout(8, 2);
  mla.separate_kv = false;
  EXPECT_THAT(HeadLayout(8, 4).CheckHeadSliced(mla),
              StatusIs(absl::StatusCode::kFailedPrecondition, "planes"));
}

}  // namespace
}  // namespace kvferry::test
