// kvferry::SourceLocation: where an object was created, for the ledger's
// survivor report (kvferry/ledger.h).
//
// SourceLocation::current() used as a default argument records the caller's
// file, line and function, as std::source_location::current() does; the
// accessors have std::source_location's names and types. function_name() is
// the function's bare name (__builtin_FUNCTION: "TestBody", not GCC's full
// signature). Unlike
// std::source_location it can also be built from values (FromValues), so a
// binding can record its own caller's site (the Python package records the
// Python file and line that created a handle). It is kvferry's own class with
// every compiler and standard library, so the library and its callers always
// agree on its layout.
#ifndef KVFERRY_SOURCE_LOCATION_H_
#define KVFERRY_SOURCE_LOCATION_H_

#include <cstdint>

namespace kvferry {

class SourceLocation {
 public:
  // The site of the call that evaluates this default argument.
  static constexpr SourceLocation current(const char* file = __builtin_FILE(),
                                          uint_least32_t line = __builtin_LINE(),
                                          const char* function = __builtin_FUNCTION()) noexcept {
    return FromValues(file, line, function);
  }
  // A site given by value. The strings are not copied: they must outlive
  // every ledger that may record this site (string literals, or strings kept
  // for the life of the process). A null pointer reads as "".
  static constexpr SourceLocation FromValues(const char* file, uint_least32_t line,
                                             const char* function) noexcept {
    SourceLocation l;
    l.file_ = file != nullptr ? file : "";
    l.line_ = line;
    l.function_ = function != nullptr ? function : "";
    return l;
  }
  // file_name() and function_name() are "" and line() is 0.
  constexpr SourceLocation() noexcept = default;

  constexpr const char* file_name() const noexcept { return file_; }
  constexpr uint_least32_t line() const noexcept { return line_; }
  // Always 0: columns are not recorded.
  constexpr uint_least32_t column() const noexcept { return 0; }
  constexpr const char* function_name() const noexcept { return function_; }

 private:
  const char* file_ = "";
  uint_least32_t line_ = 0;
  const char* function_ = "";
};

}  // namespace kvferry

#endif  // KVFERRY_SOURCE_LOCATION_H_
