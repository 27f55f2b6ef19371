# Defines cnats::nats (the NATS C client) when libnats is found, and sets
# cnats_FOUND. Used by postbox's own build and by the installed package's
# `nats` component, so both find libnats the same way.
# Debian's libnats-dev ships a cnats config that names libnats_static.a without
# installing it, and that config fails hard even under QUIET; so use the
# package only when its static archive exists, else import libnats directly.
if(NOT TARGET cnats::nats)
  find_path(POSTBOX_NATS_INCLUDE_DIR nats/nats.h)
  find_library(POSTBOX_NATS_LIBRARY nats)
  if(POSTBOX_NATS_LIBRARY)
    get_filename_component(_postbox_nats_libdir "${POSTBOX_NATS_LIBRARY}" DIRECTORY)
    if(EXISTS "${_postbox_nats_libdir}/libnats_static.a")
      find_package(cnats CONFIG QUIET)
    endif()
    unset(_postbox_nats_libdir)
  endif()
  if(NOT TARGET cnats::nats AND POSTBOX_NATS_LIBRARY AND POSTBOX_NATS_INCLUDE_DIR)
    add_library(cnats::nats UNKNOWN IMPORTED)
    set_target_properties(cnats::nats PROPERTIES IMPORTED_LOCATION "${POSTBOX_NATS_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${POSTBOX_NATS_INCLUDE_DIR}")
  endif()
endif()
if(TARGET cnats::nats)
  set(cnats_FOUND TRUE)
else()
  set(cnats_FOUND FALSE)
endif()
