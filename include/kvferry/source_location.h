// kvferry::SourceLocation: std::source_location where the standard library
// provides it (GCC 12), and an equivalent built on the same compiler builtins
// where it does not (clang 14 with libstdc++ 12 lacks
// __builtin_source_location, so <source_location> is empty there; kvferry's
// clang build needs it for -Wthread-safety).
#ifndef KVFERRY_SOURCE_LOCATION_H_
#define KVFERRY_SOURCE_LOCATION_H_

#include <cstdint>
#include <source_location>

namespace kvferry {

#if defined(__cpp_lib_source_location)
using SourceLocation = std::source_location;
#else
class SourceLocation {
 public:
  static constexpr SourceLocation current(const char* file = __builtin_FILE(),
                                          uint_least32_t line = __builtin_LINE(),
                                          const char* function = __builtin_FUNCTION()) noexcept {
    SourceLocation l;
    l.file_ = file;
    l.line_ = line;
    l.function_ = function;
    return l;
  }
  constexpr SourceLocation() noexcept = default;
  constexpr const char* file_name() const noexcept { return file_; }
  constexpr uint_least32_t line() const noexcept { return line_; }
  constexpr uint_least32_t column() const noexcept { return 0; }
  constexpr const char* function_name() const noexcept { return function_; }

 private:
  const char* file_ = "";
  uint_least32_t line_ = 0;
  const char* function_ = "";
};
#endif

}  // namespace kvferry

#endif  // KVFERRY_SOURCE_LOCATION_H_
