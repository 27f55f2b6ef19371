# Install rules (POSTBOX_INSTALL): headers, the CMake package with one export
# set per optional component, a pkg-config file per target, and the LICENSE.
if(NOT POSTBOX_INSTALL)
  return()
endif()
include(CMakePackageConfigHelpers)

set(POSTBOX_CMAKE_DIR ${CMAKE_INSTALL_DATADIR}/postbox/cmake CACHE STRING
  "Where the CMake package goes, relative to the install prefix")
set(POSTBOX_PKGCONFIG_DIR ${CMAKE_INSTALL_DATADIR}/pkgconfig CACHE STRING
  "Where the pkg-config files go, relative to the install prefix (header-only: arch-independent)")
mark_as_advanced(POSTBOX_CMAKE_DIR POSTBOX_PKGCONFIG_DIR)

# The NATS headers only with the target that makes them usable.
set(_postbox_header_excludes)
if(NOT TARGET postbox_nats)
  set(_postbox_header_excludes PATTERN "nats*.hpp" EXCLUDE)
endif()
install(DIRECTORY include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} ${_postbox_header_excludes})
install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DOCDIR})

install(TARGETS postbox EXPORT postbox-targets)
install(EXPORT postbox-targets NAMESPACE postbox:: DESTINATION ${POSTBOX_CMAKE_DIR})
export(EXPORT postbox-targets NAMESPACE postbox:: FILE ${PROJECT_BINARY_DIR}/postbox-targets.cmake)
# Each component in its own export set, loaded by postbox-config.cmake only
# when the component's dependency is found at the consumer's configure time.
foreach(_comp json fmt sqlite nats)
  if(TARGET postbox_${_comp})
    set_target_properties(postbox_${_comp} PROPERTIES EXPORT_NAME ${_comp})
    install(TARGETS postbox_${_comp} EXPORT postbox-${_comp}-targets)
    install(EXPORT postbox-${_comp}-targets NAMESPACE postbox:: DESTINATION ${POSTBOX_CMAKE_DIR})
    export(EXPORT postbox-${_comp}-targets NAMESPACE postbox::
      FILE ${PROJECT_BINARY_DIR}/postbox-${_comp}-targets.cmake)
  endif()
endforeach()

configure_package_config_file(cmake/postbox-config.cmake.in ${PROJECT_BINARY_DIR}/postbox-config.cmake
  INSTALL_DESTINATION ${POSTBOX_CMAKE_DIR})
# Header-only: the package fits any architecture, so no pointer-size check.
# SameMinorVersion until 1.0: under SameMajorVersion every 0.x would accept
# every other 0.x, and 0.x minors may break the API.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/postbox-config-version.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
configure_file(cmake/postbox-find-cnats.cmake ${PROJECT_BINARY_DIR}/postbox-find-cnats.cmake COPYONLY)
install(FILES ${PROJECT_BINARY_DIR}/postbox-config.cmake ${PROJECT_BINARY_DIR}/postbox-config-version.cmake
  cmake/postbox-find-cnats.cmake DESTINATION ${POSTBOX_CMAKE_DIR})

# pkg-config: postbox.pc for the core, postbox-<component>.pc per built
# component (Meson: dependency('postbox-json'); Make: pkg-config --cflags postbox).
# Paths are relative to the .pc file, so the install prefix can move.
if(IS_ABSOLUTE "${POSTBOX_PKGCONFIG_DIR}")
  set(_pc_dir "${POSTBOX_PKGCONFIG_DIR}")
else()
  set(_pc_dir "${CMAKE_INSTALL_PREFIX}/${POSTBOX_PKGCONFIG_DIR}")
endif()
file(RELATIVE_PATH PC_RELATIVE_PREFIX "${_pc_dir}" "${CMAKE_INSTALL_PREFIX}")
string(REGEX REPLACE "/$" "" PC_RELATIVE_PREFIX "${PC_RELATIVE_PREFIX}")
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  message(WARNING "postbox: an absolute CMAKE_INSTALL_INCLUDEDIR makes postbox.pc not relocatable")
endif()
set(_pc_core_flags "-pthread")
set(_pc postbox "header-only C++20 messaging library (needs -std=c++20)" "" "-I\${includedir} ${_pc_core_flags}"
  "${_pc_core_flags}")
set(_pc_json postbox-json "postbox's JSON codec and schema registry (nlohmann/json)" "postbox, nlohmann_json >= 3"
  "-DPOSTBOX_WITH_JSON" "")
set(_pc_fmt postbox-fmt "postbox's fmt formatters" "postbox, fmt" "-DPOSTBOX_WITH_FMT" "")
set(_pc_sqlite postbox-sqlite "postbox's SQLite store (outbox, inbox, saga state)" "postbox, sqlite3" "" "")
set(_pc_nats postbox-nats "postbox's NATS JetStream bridge (libnats)" "postbox-json, libnats" "" "")
foreach(_comp "" json fmt sqlite nats)
  if(_comp STREQUAL "")
    set(_var _pc)
  elseif(TARGET postbox_${_comp})
    set(_var _pc_${_comp})
  else()
    continue()
  endif()
  list(GET ${_var} 0 PC_NAME)
  list(GET ${_var} 1 PC_DESCRIPTION)
  list(GET ${_var} 2 PC_REQUIRES)
  list(GET ${_var} 3 PC_CFLAGS)
  list(GET ${_var} 4 PC_LIBS)
  configure_file(cmake/postbox.pc.in ${PROJECT_BINARY_DIR}/pkgconfig/${PC_NAME}.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/${PC_NAME}.pc DESTINATION ${POSTBOX_PKGCONFIG_DIR})
endforeach()
