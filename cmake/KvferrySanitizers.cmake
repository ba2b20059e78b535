# Applies KVFERRY_SANITIZE to every target in the build (library, tests, tools).
# KVFERRY_SANITIZER_COMPILE_FLAGS and KVFERRY_SANITIZER_LINK_FLAGS keep the
# flags for src/CMakeLists.txt, which puts them on the kvferry target's
# interface so that an installed sanitizer build brings its runtime (and the
# instrumentation of the consumer's own code) to whoever links it.
set(KVFERRY_SANITIZER_COMPILE_FLAGS "")
set(KVFERRY_SANITIZER_LINK_FLAGS "")
if(KVFERRY_SANITIZE STREQUAL "address")
  set(KVFERRY_SANITIZER_COMPILE_FLAGS -fsanitize=address,undefined -fno-omit-frame-pointer
                                      -fno-sanitize-recover=undefined)
  set(KVFERRY_SANITIZER_LINK_FLAGS -fsanitize=address,undefined)
elseif(KVFERRY_SANITIZE STREQUAL "thread")
  set(KVFERRY_SANITIZER_COMPILE_FLAGS -fsanitize=thread -fno-omit-frame-pointer)
  set(KVFERRY_SANITIZER_LINK_FLAGS -fsanitize=thread)
elseif(KVFERRY_SANITIZE)
  message(FATAL_ERROR "KVFERRY_SANITIZE must be empty, 'address' or 'thread', not '${KVFERRY_SANITIZE}'")
endif()
if(KVFERRY_SANITIZE)
  add_compile_options(${KVFERRY_SANITIZER_COMPILE_FLAGS})
  add_link_options(${KVFERRY_SANITIZER_LINK_FLAGS})
endif()
