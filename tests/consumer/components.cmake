# Shared by the consumer projects: POSTBOX_CONSUMER_COMPONENTS is a
# comma-separated list (a ';' would not survive ctest --build-and-test's
# --build-options); postbox_consumer_link(<target> <prefix>) links <prefix><c>
# for each and defines POSTBOX_CONSUMER_<C> for consumer.cpp's checks.
string(REPLACE "," ";" POSTBOX_CONSUMER_COMPONENTS "${POSTBOX_CONSUMER_COMPONENTS}")
function(postbox_consumer_define target)
  foreach(c IN LISTS POSTBOX_CONSUMER_COMPONENTS)
    string(TOUPPER "${c}" C)
    target_compile_definitions(${target} PRIVATE POSTBOX_CONSUMER_${C})
  endforeach()
endfunction()
