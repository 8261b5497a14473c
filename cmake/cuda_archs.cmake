# Default CUDA architectures: the GPUs people train on. Overridden by
# CMAKE_CUDA_ARCHITECTURES (or the CUDAARCHS environment variable, which CMake reads).
# Real SASS for each, plus PTX of the newest so that future GPUs can JIT it. SASS runs on
# later minor revisions of the same major (sm_100 on sm_103, sm_120 on sm_121), so one
# entry per major is enough; sm_75 is the oldest nvcc 13 still targets.
# Device code is C++17 like the host code (nvcc's default follows the host compiler).
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  include(CheckLanguage)
  # Toolkit version is known only after the compiler is found.
  execute_process(COMMAND ${CMAKE_CUDA_COMPILER} --version OUTPUT_VARIABLE _nvcc_out)
  string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${_nvcc_out}")
  set(_cuda_major ${CMAKE_MATCH_1})
  set(_cuda_minor ${CMAKE_MATCH_2})
  set(_archs 75-real 80-real 86-real 89-real 90-real)
  if(_cuda_major GREATER_EQUAL 13 OR (_cuda_major EQUAL 12 AND _cuda_minor GREATER_EQUAL 8))
    list(APPEND _archs 100-real 120-real 120-virtual)
  else()
    list(APPEND _archs 90-virtual)
  endif()
  set(CMAKE_CUDA_ARCHITECTURES ${_archs})
endif()
if(DEFINED ENV{CUDAARCHS} AND NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES $ENV{CUDAARCHS})
endif()
string(REPLACE ";" "," REFT_EXT_CUDA_ARCHS_STRING "${CMAKE_CUDA_ARCHITECTURES}")
message(STATUS "reft_ext: CUDA architectures ${CMAKE_CUDA_ARCHITECTURES}")
