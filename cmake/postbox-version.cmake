# Reads POSTBOX_VERSION from include/postbox/version.hpp: the one source of the version.
file(READ "${CMAKE_CURRENT_LIST_DIR}/../include/postbox/version.hpp" _postbox_version_hpp)
foreach(_part MAJOR MINOR PATCH)
  string(REGEX MATCH "#define POSTBOX_VERSION_${_part} ([0-9]+)" _ "${_postbox_version_hpp}")
  set(_postbox_${_part} "${CMAKE_MATCH_1}")
endforeach()
set(POSTBOX_VERSION "${_postbox_MAJOR}.${_postbox_MINOR}.${_postbox_PATCH}")
