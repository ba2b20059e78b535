// libFuzzer target for the control-message decoder and the offer-ticket
// decoder: any input must either be rejected with a status or decode to a
// message (a ticket) that re-encodes to an equivalent one (the same body).
// ASan/UBSan catch out-of-bounds reads.
#include <cstdint>
#include <cstdlib>

#include "src/wire/message.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvferry::internal::wire::Decode;
  using kvferry::internal::wire::DecodeTicket;
  using kvferry::internal::wire::Encode;
  using kvferry::internal::wire::EncodeTicketBody;
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  auto message = Decode(input);
  if (message.ok()) {
    auto again = Decode(Encode(*message));
    if (!again.ok() || !(*again == *message)) std::abort();
  }
  absl::string_view body;
  auto ticket = DecodeTicket(input, &body);
  if (ticket.ok() && EncodeTicketBody(*ticket) != body) std::abort();
  return 0;
}
