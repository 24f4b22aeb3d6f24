# fastattn_tool_flags: tools/kernel_flags.hpp, the kernels' knobs (and the --window, --estimate-error
# and --max-error wrappers) as CLI11 flags, for every program that takes kernel flags: the
# `fastattn` tool (tools/) and the BERT example's fastattn_mlm (examples/). Both directories
# include this file; whichever is configured first defines the target. CLI11 is the tools'
# dependency only, never fastattn::fastattn's.
if(NOT TARGET fastattn_tool_flags)
  find_package(CLI11 2 REQUIRED CONFIG)
  add_library(fastattn_tool_flags INTERFACE)
  target_include_directories(fastattn_tool_flags INTERFACE ${CMAKE_CURRENT_LIST_DIR})
  target_link_libraries(fastattn_tool_flags INTERFACE fastattn::fastattn CLI11::CLI11)
endif()
