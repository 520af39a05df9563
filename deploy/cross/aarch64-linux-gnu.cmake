# CMake toolchain file for cross-compiling to 64-bit ARM Linux (Raspberry Pi
# 3/4/5 running a 64-bit OS) with Debian's GNU cross toolchain
# (gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, libc6-dev-arm64-cross).
#
# deploy/cross/build-aarch64.sh hands it to boring-sys (which builds
# BoringSSL with CMake) via CMAKE_TOOLCHAIN_FILE_aarch64_unknown_linux_gnu.
# When a toolchain file is given, neither boring-sys nor the cmake crate
# pass compilers to CMake, so they are named here. CC_aarch64_unknown_linux_gnu
# / CXX_aarch64_unknown_linux_gnu (the variables the cc crate reads)
# override them, so one setting drives both cargo and CMake.

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(DEFINED ENV{CC_aarch64_unknown_linux_gnu})
  set(CMAKE_C_COMPILER "$ENV{CC_aarch64_unknown_linux_gnu}")
else()
  set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
endif()
if(DEFINED ENV{CXX_aarch64_unknown_linux_gnu})
  set(CMAKE_CXX_COMPILER "$ENV{CXX_aarch64_unknown_linux_gnu}")
else()
  set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
endif()
# BoringSSL's assembly (.S) goes through the C compiler (preprocessed).
set(CMAKE_ASM_COMPILER "${CMAKE_C_COMPILER}")

# Debian's multiarch-less cross sysroot: headers and libraries of the
# target live under /usr/aarch64-linux-gnu. Look for libraries, headers
# and packages there only; run build tools (perl, go if any) from the host.
if(DEFINED ENV{ZTNA_CROSS_SYSROOT})
  set(CMAKE_FIND_ROOT_PATH "$ENV{ZTNA_CROSS_SYSROOT}")
else()
  set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
endif()
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
