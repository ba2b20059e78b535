# FindUCX: locate UCX through pkg-config and provide the imported target UCX::ucx
# (ucp, uct, ucs and ucm). Sets UCX_FOUND and UCX_VERSION.
find_package(PkgConfig QUIET REQUIRED)
pkg_check_modules(PC_UCX QUIET IMPORTED_TARGET GLOBAL ucx)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(UCX
  REQUIRED_VARS PC_UCX_LINK_LIBRARIES
  VERSION_VAR PC_UCX_VERSION)
if(UCX_FOUND)
  set(UCX_VERSION ${PC_UCX_VERSION})
  if(NOT TARGET UCX::ucx)
    add_library(UCX::ucx ALIAS PkgConfig::PC_UCX)
  endif()
endif()
