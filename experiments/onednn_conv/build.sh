#!/bin/bash
# Builds experiments/onednn_conv/libonednn_conv.so (XLA FFI handlers calling oneDNN).
#
#   ONEDNN_PREFIX=/var/tmp/h74-onednn experiments/onednn_conv/build.sh
#
# oneDNN: the `onednn` + `onednn-devel` wheels (2026.1.0, oneDNN v3.13, SYCL CPU runtime with TBB
# threads; they pull the Intel SYCL/OpenCL/compiler runtimes, ~2 GB), installed out of the
# shared environment with
#   pip install --prefix "$ONEDNN_PREFIX" onednn onednn-devel
# (default prefix: the active Python's sys.prefix, where a plain `pip install` puts them).
# The .so gets an old-style RPATH to $ONEDNN_PREFIX/lib so that libdnnl's own dependencies
# (libtbb, libsycl, libsvml, ...) resolve without LD_LIBRARY_PATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
prefix=${ONEDNN_PREFIX:-$($py -c 'import sys; print(sys.prefix)')}
ffi_inc=$($py -c 'import jax; print(jax.ffi.include_dir())')
test -f "$prefix/include/oneapi/dnnl/dnnl.hpp" || { echo "no oneDNN headers under $prefix" >&2; exit 1; }
set -x
nice -n 15 g++ -O2 -std=c++17 -shared -fPIC \
  -I"$ffi_inc" -I"$prefix/include" "$here/onednn_conv.cc" \
  -L"$prefix/lib" -ldnnl -Wl,--disable-new-dtags,-rpath,"$prefix/lib" \
  -o "$here/libonednn_conv.so"
echo "$prefix" > "$here/libonednn_conv.prefix"
