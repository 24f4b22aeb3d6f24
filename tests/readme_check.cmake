# The README's quick start must be examples/quickstart.cpp verbatim (which the tests compile and
# run), so the README cannot rot.
file(READ ${SOURCE_DIR}/README.md readme)
file(READ ${SOURCE_DIR}/examples/quickstart.cpp quickstart)
string(FIND "${readme}" "${quickstart}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md's quick start differs from examples/quickstart.cpp; paste the file into the README")
endif()
