// A peer that lies about its pool's extent (issue 22, part 3). The peer
// (tests/pool_extent_peer.cc, another process) knows the secret and
// declares its real 256 KiB pool (8 blocks) with a layout of 40 or 1,000,000
// blocks, keeping its genuine base and remote key (or with its real length
// and the base moved out of the memory), in its PROOF or in a later
// POOL_ADDED. This process is the receiver: an agent listening with a
// pool of its own (in the FromListener cases the liar listens and the
// receiver connects to it, reading the lie in the liar's WELCOME).
//
// Two paths, each the one this host gives the peer's pool:
//   Shm         the peer's pool is a UCX shared-memory segment: the
//               receiver attaches it and copies through the mapping
//               (shm-direct); before the check, a region past the segment
//               made it copy from and into its own private memory, or crash;
//   KernelCopy  the peer's pool is engine memory (RegisterPool) followed by
//               4 MiB of PROT_NONE: the receiver copies with
//               process_vm_writev/readv into the verified peer process.
// Asserted for each: the descriptor is refused (REJECT naming the pool and
// region) or the peer failed (POOL_ADDED); WRITE, READ and a READ on an
// offer ticket naming the far block all fail without crashing; a canary
// mapping of this process made just before the peer connected (mappings
// are placed top-down, so the attached segment usually lands right below it:
// without the check, the 40-block WRITE changed it) and the receiver's own
// blocks are untouched; the live counters return to their baseline; and an honest
// peer (the same program declaring 8 blocks) then moves verified data both
// ways and on a ticket.
#include <sys/mman.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry {
namespace {

using test::BlockChecksum;
using test::ChildProcess;
using test::ExpectedChecksum;
using test::FillBlock;
using test::IsOk;
using test::StatusIs;
using test::WaitFor;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr const char* kPeerBinary = KVFERRY_POOL_EXTENT_PEER;
constexpr char kSecret[] = "pool-extent-test-secret";
constexpr char kTls[] = "posix,sysv,tcp";
constexpr absl::Duration kDeadline = absl::Seconds(30);

KvLayout Layout(uint32_t blocks) {
  // 4 layers, K and V, 4 KiB chunks: 32 KiB per block (as the peer's).
  return KvLayout{.num_layers = 4, .num_blocks = blocks, .tokens_per_block = 16,
                  .num_kv_heads = 2, .head_dim = 64, .element_bytes = 2};
}

// A private mapping of this process holding a pattern.
class Canary {
 public:
  explicit Canary(size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    base_ = static_cast<uint64_t*>(p);
    for (size_t i = 0; i < bytes_ / 8; ++i) base_[i] = Word(i);
  }
  ~Canary() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }
  Canary(const Canary&) = delete;
  Canary& operator=(const Canary&) = delete;

  bool mapped() const { return base_ != nullptr; }
  // The offset of the first word that changed, or nullopt.
  std::optional<size_t> FirstChanged() const {
    for (size_t i = 0; i < bytes_ / 8; ++i) {
      if (base_[i] != Word(i)) return i * 8;
    }
    return std::nullopt;
  }

 private:
  static uint64_t Word(size_t i) { return test::Mix(0xca4a7e11 ^ i); }

  size_t bytes_;
  uint64_t* base_ = nullptr;
};

struct ExtentCase {
  const char* name;
  bool kernel_copy;     // the peer's pool is engine memory, not a UCX segment
  uint32_t blocks;      // what the peer declares (it has 8)
  bool via_pool_added;  // declared in a POOL_ADDED after an honest handshake
  int64_t shift = 0;    // the declared base is moved by this many bytes
  bool liar_listens = false;  // the liar is the listener, this agent connects to it
};
void PrintTo(const ExtentCase& c, std::ostream* os) { *os << c.name; }

class PoolExtentTest : public ::testing::TestWithParam<ExtentCase> {
 protected:
  void SetUp() override {
    AgentOptions o;
    o.name = "decode";
    o.leak_policy = LeakPolicy::kAbort;
    o.shared_secret = kSecret;
    o.ucx_config = {{"TLS", kTls}};
    auto listening = test::StartListeningAgent(o, Layout(64));
    ASSERT_THAT(listening, IsOk());
    receiver_ = std::move(listening->agent);
    pool_ = listening->pool;
    port_ = listening->port;
    baseline_ = receiver_->GetStats();
  }

  std::unique_ptr<ChildProcess> StartPeer(const std::string& name, uint32_t blocks,
                                          bool via_pool_added, int64_t shift = 0) {
    return std::make_unique<ChildProcess>(std::vector<std::string>{
        kPeerBinary, absl::StrCat("--port=", port_), absl::StrCat("--secret=", kSecret),
        "--name=" + name, "--receiver=decode", absl::StrCat("--tls=", kTls),
        GetParam().kernel_copy ? "--memory=engine" : "--memory=ucx",
        absl::StrCat("--blocks=", blocks), absl::StrCat("--shift=", shift),
        via_pool_added ? "--via=pool_added" : "--via=proof",
        name == "liar" && GetParam().liar_listens ? "--role=server" : "--role=client"});
  }

  static std::string Ticket(ChildProcess& child) {
    std::optional<std::string> line = child.ReadUntil("TICKET ");
    EXPECT_TRUE(line.has_value() && absl::StartsWith(*line, "TICKET "))
        << line.value_or("no TICKET line");
    if (!line || !absl::StartsWith(*line, "TICKET ")) return "";
    return absl::HexStringToBytes(line->substr(7));
  }

  // Posts `spec` and waits for it: whether the transfer completed.
  bool Moves(const TransferSpec& spec) {
    auto t = receiver_->PostTransfer(spec);
    if (!t.ok()) return false;
    absl::Status s = t->Wait(kDeadline);
    return s.ok() && t->state() == TransferState::kDone;
  }

  void ExpectBaseline(const std::string& when) {
    EXPECT_TRUE(WaitFor([&] { return receiver_->GetStats() == baseline_; }, kDeadline))
        << when << "\nnow      " << receiver_->GetStats().ToString() << "\nbaseline "
        << baseline_.ToString() << "\n" << receiver_->ledger().Report();
  }

  // The peer "liar", connected, fails (it declared its pool "kv2" in a
  // POOL_ADDED) and its status names that pool's region.
  void ExpectLiarFailedOnItsSecondPool() {
    EXPECT_TRUE(WaitFor([&] {
      auto p = receiver_->GetPeer("liar");
      return p.ok() && p->state == PeerState::kFailed;
    }, kDeadline));
    auto p = receiver_->GetPeer("liar");
    ASSERT_THAT(p, IsOk());
    EXPECT_THAT(std::string(p->status.message()), HasSubstr("pool 'kv2' region 0"));
  }

  // The same program declaring its 8 blocks truthfully: connected on the
  // path this case is about, it is written, read back and read on a ticket.
  void ExpectHonestPeerWorks() {
    auto child = StartPeer("honest", 8, /*via_pool_added=*/false);
    ASSERT_EQ(child->ReadUntil("WELCOME").value_or("no answer"), "WELCOME");
    const std::string ticket = Ticket(*child);
    auto peer = receiver_->WaitForPeer("honest", kDeadline);
    ASSERT_THAT(peer, IsOk());
    EXPECT_EQ(peer->data_path,
              GetParam().kernel_copy ? kDataPathKernelCopy : kDataPathShmDirect);
    {
      const std::vector<uint32_t> remote = {1, 2, 4, 6};
      auto written = pool_->Lease(4);
      ASSERT_THAT(written, IsOk());
      for (size_t i = 0; i < remote.size(); ++i) FillBlock(*written, i, 31, remote[i]);
      EXPECT_TRUE(Moves({.op = TransferOp::kWrite, .peer = "honest", .local = &*written,
                         .remote_blocks = remote}));
      auto read = pool_->Lease(4);
      ASSERT_THAT(read, IsOk());
      EXPECT_TRUE(Moves({.op = TransferOp::kRead, .peer = "honest", .local = &*read,
                         .remote_blocks = remote}));
      for (size_t i = 0; i < remote.size(); ++i) {
        EXPECT_EQ(BlockChecksum(*read, i), ExpectedChecksum(Layout(64), 31, remote[i]))
            << "block " << remote[i] << " read back";
      }
      // The ticket names block 7, which the peer filled with (77, 7).
      auto offered = pool_->Lease(1);
      ASSERT_THAT(offered, IsOk());
      EXPECT_TRUE(Moves({.op = TransferOp::kRead, .peer = "honest", .local = &*offered,
                         .offer_ticket = ticket}));
      EXPECT_EQ(BlockChecksum(*offered, 0), ExpectedChecksum(Layout(64), 77, 7));
    }
    EXPECT_THAT(receiver_->Disconnect("honest"), IsOk());
    child->CloseStdin();
    EXPECT_EQ(child->Wait(), 0);
    ExpectBaseline("after the honest peer");
  }

  std::unique_ptr<Agent> receiver_;
  KvPool* pool_ = nullptr;
  uint16_t port_ = 0;
  Stats baseline_;
};

TEST_P(PoolExtentTest, LyingExtentIsRefusedBeforeAnyBlockMoves) {
  const ExtentCase& c = GetParam();
  const uint32_t far = c.blocks - 1;
  const std::string remote_pool = c.via_pool_added ? "kv2" : "kv";
  {
    // Made before the peer connects: its segment is usually attached right below it.
    Canary canary(8 << 20);
    ASSERT_TRUE(canary.mapped());
    // Blocks of the receiver's own pool, which a READ would fill.
    auto local = pool_->Lease(1);
    ASSERT_THAT(local, IsOk());
    FillBlock(*local, 0, 901, 0);
    const uint64_t local_sum = ExpectedChecksum(Layout(64), 901, 0);

    auto child = StartPeer("liar", c.blocks, c.via_pool_added, c.shift);
    std::string ticket;  // for block `far` of the declared pool, printed after the answer
    if (c.liar_listens) {
      // This agent connects; the liar's WELCOME carries the declarations.
      uint32_t port = 0;
      const std::string line = child->ReadUntil("PORT ").value_or("no PORT line");
      ASSERT_TRUE(absl::StartsWith(line, "PORT ") && absl::SimpleAtoi(line.substr(5), &port))
          << line;
      auto connected = receiver_->Connect("127.0.0.1", static_cast<uint16_t>(port), kDeadline);
      ticket = Ticket(*child);
      if (!c.via_pool_added) {
        EXPECT_THAT(connected, StatusIs(absl::StatusCode::kInvalidArgument, "pool 'kv' region 0"));
      } else if (connected.ok()) {
        ASSERT_NO_FATAL_FAILURE(ExpectLiarFailedOnItsSecondPool());
      } else {
        // The POOL_ADDED arrived while this side's data path was still
        // coming up (a peer may send it as soon as its own side is up): the
        // same refusal, reported by Connect.
        EXPECT_THAT(connected, StatusIs(absl::StatusCode::kInvalidArgument, "pool 'kv2' region 0"));
      }
      EXPECT_EQ(child->ReadUntil("CLOSED").value_or("no answer"), "CLOSED");
    } else if (!c.via_pool_added) {
      // The first line is the answer to the PROOF (WELCOME or REJECT).
      const std::string answer = child->ReadLine(kDeadline).value_or("no answer");
      ticket = Ticket(*child);
      EXPECT_THAT(answer, StartsWith("REJECT INVALID_ARGUMENT "));
      EXPECT_THAT(answer, HasSubstr("pool 'kv' region 0"));
      if (c.kernel_copy) {
        EXPECT_THAT(answer, HasSubstr("does not lie in the memory of the peer's process"));
      } else if (c.shift == 0) {
        EXPECT_THAT(answer, HasSubstr("past the end of the segment"));
      }  // else where the base lands here depends on what this process maps around it
    } else {
      ASSERT_EQ(child->ReadUntil("WELCOME").value_or("no answer"), "WELCOME");
      ASSERT_EQ(child->ReadUntil("ADDED").value_or("no answer"), "ADDED");
      ticket = Ticket(*child);
      ASSERT_NO_FATAL_FAILURE(ExpectLiarFailedOnItsSecondPool());
      EXPECT_EQ(child->ReadUntil("CLOSED").value_or("no answer"), "CLOSED");
    }
    ASSERT_FALSE(ticket.empty());
    auto peer = receiver_->GetPeer("liar");
    EXPECT_TRUE(!peer.ok() || peer->state != PeerState::kConnected);

    // Every way of moving the far block is refused, and nothing crashes.
    EXPECT_FALSE(Moves({.op = TransferOp::kWrite, .peer = "liar", .remote_pool = remote_pool,
                        .local = &*local, .remote_blocks = {far}}));
    EXPECT_FALSE(Moves({.op = TransferOp::kRead, .peer = "liar", .remote_pool = remote_pool,
                        .local = &*local, .remote_blocks = {far}}));
    EXPECT_FALSE(Moves({.op = TransferOp::kRead, .peer = "liar", .local = &*local,
                        .offer_ticket = ticket}));
    EXPECT_FALSE(Moves({.op = TransferOp::kRead, .peer = "liar", .remote_pool = remote_pool,
                        .local = &*local, .remote_blocks = {0}}));

    EXPECT_EQ(BlockChecksum(*local, 0), local_sum) << "a READ wrote into the receiver's block";
    std::optional<size_t> changed = canary.FirstChanged();
    EXPECT_FALSE(changed.has_value()) << "the receiver's private memory changed at byte "
                                      << changed.value_or(0) << " of the canary";
    child->CloseStdin();
    EXPECT_EQ(child->Wait(), 0);
  }
  ExpectBaseline("after the lying peer");
  ExpectHonestPeerWorks();
}

INSTANTIATE_TEST_SUITE_P(
    Paths, PoolExtentTest,
    ::testing::Values(ExtentCase{"Shm40Blocks", false, 40, false},
                      ExtentCase{"Shm1000000Blocks", false, 1000000, false},
                      ExtentCase{"Shm40BlocksPoolAdded", false, 40, true},
                      ExtentCase{"Shm1000000BlocksPoolAdded", false, 1000000, true},
                      ExtentCase{"KernelCopy40Blocks", true, 40, false},
                      ExtentCase{"KernelCopy1000000Blocks", true, 1000000, false},
                      ExtentCase{"KernelCopy40BlocksPoolAdded", true, 40, true},
                      ExtentCase{"KernelCopy1000000BlocksPoolAdded", true, 1000000, true},
                      // The real length, the base moved out of the segment.
                      ExtentCase{"ShmBaseMovedUp", false, 8, false, 256 << 10},
                      ExtentCase{"ShmBaseMovedDown", false, 8, false, -(256 << 10)},
                      ExtentCase{"ShmBaseMovedUpPoolAdded", false, 8, true, 4096},
                      ExtentCase{"KernelCopyBaseMovedUp", true, 8, false, 256 << 10},
                      // The same lies in the WELCOME of a listener this agent connects to.
                      ExtentCase{"Shm40BlocksFromListener", false, 40, false, 0, true},
                      ExtentCase{"Shm1000000BlocksPoolAddedFromListener", false, 1000000, true, 0,
                                 true},
                      ExtentCase{"KernelCopy40BlocksFromListener", true, 40, false, 0, true},
                      ExtentCase{"KernelCopy1000000BlocksPoolAddedFromListener", true, 1000000,
                                 true, 0, true}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace kvferry
