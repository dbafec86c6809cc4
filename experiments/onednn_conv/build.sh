#!/bin/bash
# Builds experiments/onednn_conv/libonednn_conv.so (XLA FFI handlers calling oneDNN).
#
#   experiments/onednn_conv/build.sh                                   # Debian's oneDNN (/usr)
#   ONEDNN_PREFIX=/var/tmp/h74-onednn experiments/onednn_conv/build.sh  # the pip wheels
#
# oneDNN, either of:
# - Debian's (bookworm: 2.6.3, OpenMP threads, CPU + OpenCL GPU runtime, no SYCL):
#     apt-get install -y libdnnl-dev     # libdnnl2: 7.0 MB download, 38.8 MB installed
#   headers in /usr/include/oneapi/dnnl, libdnnl.so in the default library path.
# - the `onednn` + `onednn-devel` wheels (2026.1.0, oneDNN v3.13, SYCL CPU runtime with TBB
#   threads; they pull the Intel SYCL/OpenCL/compiler runtimes, ~2 GB), out of the shared env:
#     pip install --prefix "$ONEDNN_PREFIX" onednn onednn-devel
#   The .so gets an old-style RPATH to $ONEDNN_PREFIX/lib so that libdnnl's own dependencies
#   (libtbb, libsycl, libsvml, ...) resolve without LD_LIBRARY_PATH.
# OUT: the library to write (default experiments/onednn_conv/libonednn_conv.so; the Python side
# loads another one named by ONEDNN_CONV_LIB). Default ONEDNN_PREFIX: the active Python's sys.prefix if it has the headers, else /usr.
# onednn_conv.cc picks the C++ API by DNNL_VERSION_MAJOR (2.x op descriptors or 3.x) and, with
# an OpenMP runtime (DNNL_CPU_RUNTIME in dnnl_config.h), is compiled with -fopenmp (omp.h).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/libonednn_conv.so}
py=${PYTHON:-python}
ffi_inc=$($py -c 'import jax; print(jax.ffi.include_dir())')
if [ -z "${ONEDNN_PREFIX:-}" ]; then
  ONEDNN_PREFIX=$($py -c 'import sys; print(sys.prefix)')
  test -f "$ONEDNN_PREFIX/include/oneapi/dnnl/dnnl.hpp" || ONEDNN_PREFIX=/usr
fi
prefix=$ONEDNN_PREFIX
cfg="$prefix/include/oneapi/dnnl/dnnl_config.h"
test -f "$prefix/include/oneapi/dnnl/dnnl.hpp" || {
  echo "no oneDNN headers under $prefix (apt-get install libdnnl-dev, or set ONEDNN_PREFIX)" >&2
  exit 1
}
ver=$(sed -n 's/^#define DNNL_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' \
  "$prefix/include/oneapi/dnnl/dnnl_version.h" | paste -sd.)
runtime=$(sed -n 's/^#define DNNL_CPU_RUNTIME DNNL_RUNTIME_\([A-Z]*\).*/\1/p' "$cfg")
echo "oneDNN $ver under $prefix, CPU runtime $runtime" >&2
extra=()
[ "$runtime" = OMP ] && extra+=(-fopenmp)
link=(-L"$prefix/lib" -ldnnl)
[ "$prefix" != /usr ] && link+=(-Wl,--disable-new-dtags,-rpath,"$prefix/lib")
set -x
nice -n 15 g++ -O2 -std=c++17 -shared -fPIC "${extra[@]}" \
  -I"$ffi_inc" -I"$prefix/include" "$here/onednn_conv.cc" \
  "${link[@]}" -o "$out"
echo "$prefix" > "${out%.so}.prefix"
