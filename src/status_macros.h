// KVFERRY_RETURN_IF_ERROR / KVFERRY_ASSIGN_OR_RETURN: Debian's abseil
// (20220623) has no status_macros.h, so kvferry defines its own, once.
#ifndef KVFERRY_SRC_STATUS_MACROS_H_
#define KVFERRY_SRC_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVFERRY_RETURN_IF_ERROR(expr)          \
  do {                                         \
    ::absl::Status kvferry_status_ = (expr);   \
    if (!kvferry_status_.ok()) return kvferry_status_; \
  } while (0)

#define KVFERRY_CONCAT_INNER_(a, b) a##b
#define KVFERRY_CONCAT_(a, b) KVFERRY_CONCAT_INNER_(a, b)

#define KVFERRY_ASSIGN_OR_RETURN(lhs, expr) \
  KVFERRY_ASSIGN_OR_RETURN_IMPL_(KVFERRY_CONCAT_(kvferry_sor_, __LINE__), lhs, expr)

#define KVFERRY_ASSIGN_OR_RETURN_IMPL_(sor, lhs, expr) \
  auto sor = (expr);                                   \
  if (!sor.ok()) return std::move(sor).status();       \
  lhs = std::move(*sor)

#endif  // KVFERRY_SRC_STATUS_MACROS_H_
