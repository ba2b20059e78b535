# Applies KVFERRY_SANITIZE to every target in the build (library, tests, tools).
if(KVFERRY_SANITIZE STREQUAL "address")
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer
                      -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
elseif(KVFERRY_SANITIZE STREQUAL "thread")
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
elseif(KVFERRY_SANITIZE)
  message(FATAL_ERROR "KVFERRY_SANITIZE must be empty, 'address' or 'thread', not '${KVFERRY_SANITIZE}'")
endif()
