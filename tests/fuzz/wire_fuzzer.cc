// libFuzzer target for the control-message decoder: any input must either be
// rejected with a status or decode to a message that re-encodes to an
// equivalent one. ASan/UBSan catch out-of-bounds reads.
#include <cstdint>
#include <cstdlib>

#include "src/wire/message.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvferry::internal::wire::Decode;
  using kvferry::internal::wire::Encode;
  auto message = Decode(absl::string_view(reinterpret_cast<const char*>(data), size));
  if (!message.ok()) return 0;
  auto again = Decode(Encode(*message));
  if (!again.ok() || !(*again == *message)) std::abort();
  return 0;
}
