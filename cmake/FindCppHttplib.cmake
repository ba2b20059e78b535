# FindCppHttplib: Debian's cpp-httplib (libcpp-httplib-dev) through pkg-config;
# provides the imported target CppHttplib::CppHttplib.
find_package(PkgConfig QUIET REQUIRED)
pkg_check_modules(PC_HTTPLIB QUIET IMPORTED_TARGET GLOBAL cpp-httplib)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(CppHttplib
  REQUIRED_VARS PC_HTTPLIB_LINK_LIBRARIES
  VERSION_VAR PC_HTTPLIB_VERSION)
if(CppHttplib_FOUND AND NOT TARGET CppHttplib::CppHttplib)
  add_library(CppHttplib::CppHttplib ALIAS PkgConfig::PC_HTTPLIB)
endif()
