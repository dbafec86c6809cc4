// XLA FFI handlers: NHWC / HWIO 2-D convolution (forward, backward-data, backward-weights) by
// oneDNN primitives, for fer_jax.model.onednn_conv (which builds this file: `python -m
// fer_jax.model.onednn_conv`; docs/cpu_performance.md). Float32 or bfloat16 operands; the
// result dtype is the result buffer's (f32 or bf16; oneDNN accumulates bf16 in f32).
//
// Every handler takes two operand buffers and one result buffer; all shapes come from the
// buffers, so one generic Run() serves the three ops:
//   fwd:         a = x  (N,H,W,Ci)   b = w  (KH,KW,Ci,Co)  out = y  (N,Ho,Wo,Co)
//   bwd_data:    a = dy (N,Ho,Wo,Co) b = w  (KH,KW,Ci,Co)  out = dx (N,H,W,Ci)
//   bwd_weights: a = x  (N,H,W,Ci)   b = dy (N,Ho,Wo,Co)   out = dw (KH,KW,Ci,Co)
// Attributes: stride, padding (symmetric, both axes). Activations go to oneDNN in the NHWC
// order XLA holds them (oneDNN picks its brgemm kernels for NHWC); weights in the layout oneDNN
// prefers (format_tag::any), reordered from/to HWIO on every call (small). Letting oneDNN pick
// blocked activation layouts too, with reorders around each call, was slower (prototype).
//
// Primitive descriptors, primitives, reorders and internal buffers (including the scratchpad,
// scratchpad_mode::user) are cached per (op, shape, dtypes), so a call allocates nothing; a
// cache entry has a mutex, so concurrent calls of the same key run one after the other.
//
// Builds against oneDNN 3.x (primitive descriptors made directly from memory descriptors) and
// 2.x >= 2.6 (through op descriptors, `convolution_forward::desc`; e.g. Debian's libdnnl-dev
// 2.6.3): see the DNNL_VERSION_MAJOR branches. With an OpenMP CPU runtime (Debian's), the number
// of threads oneDNN uses is set per calling thread from FER_JAX_ONEDNN_CONV_THREADS (default:
// OpenMP's own default, OMP_NUM_THREADS or the CPUs the process may run on).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Op : int { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };
const char* kOpNames[] = {"fwd", "bwd_data", "bwd_weights"};

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

struct Key {
  int op, n, h, w, ci, co, kh, kw, stride, pad, src_dt, dst_dt;
  bool operator<(const Key& o) const {
    return std::tie(op, n, h, w, ci, co, kh, kw, stride, pad, src_dt, dst_dt) <
           std::tie(o.op, o.n, o.h, o.w, o.ci, o.co, o.kh, o.kw, o.stride, o.pad, o.src_dt,
                    o.dst_dt);
  }
};

// One operand or result: the caller's layout, the primitive's, and (if they differ) a reorder
// and a cached buffer in the primitive's layout.
struct Slot {
  int arg = 0;
  memory::desc user_md, prim_md;
  bool needs_reorder = false;
  memory prim_mem;
  dnnl::reorder reorder;  // user -> prim for inputs, prim -> user for the result
};

struct Entry {
  std::mutex mu;
  dnnl::primitive prim;
  std::string impl;
  Slot in[2];
  Slot out;
  memory scratch;
  long calls = 0;
};

std::mutex g_cache_mu;
std::map<Key, std::unique_ptr<Entry>> g_cache;

dt ToDnnl(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return dt::f32;
    case ffi::DataType::BF16:
      return dt::bf16;
    default:
      return dt::undef;
  }
}

void InitSlot(Slot& s, int arg, const memory::desc& user, const memory::desc& prim, bool input) {
  auto& eng = Engine();
  s.arg = arg;
  s.user_md = user;
  s.prim_md = prim;
  s.needs_reorder = user != prim;
  if (s.needs_reorder) {
    s.prim_mem = memory(prim, eng);
    s.reorder = input ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, user, eng, prim))
                      : dnnl::reorder(dnnl::reorder::primitive_desc(eng, prim, eng, user));
  }
}

std::unique_ptr<Entry> Build(const Key& k) {
  auto& eng = Engine();
  const dt sdt = static_cast<dt>(k.src_dt), odt = static_cast<dt>(k.dst_dt);
  const int ho = (k.h + 2 * k.pad - k.kh) / k.stride + 1;
  const int wo = (k.w + 2 * k.pad - k.kw) / k.stride + 1;
  const memory::dims src_d = {k.n, k.ci, k.h, k.w}, dst_d = {k.n, k.co, ho, wo};
  const memory::dims wei_d = {k.co, k.ci, k.kh, k.kw};
  const memory::dims strides = {k.stride, k.stride}, pads = {k.pad, k.pad};
  const tag act = tag::nhwc;
  // Data types per tensor: the operands in src_dt, the result in dst_dt.
  const dt src_t = k.op == kBwdData ? odt : sdt;
  const dt wei_t = k.op == kBwdWeights ? odt : sdt;
  const dt dst_t = k.op == kFwd ? odt : sdt;
  memory::desc src(src_d, src_t, act), wei(wei_d, wei_t, tag::any), dst(dst_d, dst_t, act);
  memory::desc src_u(src_d, src_t, tag::nhwc), wei_u(wei_d, wei_t, tag::hwio),
      dst_u(dst_d, dst_t, tag::nhwc);

  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // Forward descriptor: the primitive itself, or the hint of the backward ones (data types as
  // the forward of this backward would have them).
  memory::desc fsrc(src_d, sdt, act), fwei(wei_d, sdt, tag::any), fdst(dst_d, sdt, act);
  if (k.op == kFwd) fdst = dst;
  const auto fwd_prop = dnnl::prop_kind::forward_training;
  const auto algo = dnnl::algorithm::convolution_direct;
#if DNNL_VERSION_MAJOR >= 3
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(eng, fwd_prop, algo, fsrc, fwei, fdst,
                                                          strides, pads, pads, attr);
#else
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(fwd_prop, algo, fsrc, fwei, fdst, strides, pads, pads),
      attr, eng);
#endif

  auto e = std::make_unique<Entry>();
  memory::desc scratch_md;
  if (k.op == kFwd) {
    e->prim = dnnl::convolution_forward(fwd_pd);
    e->impl = fwd_pd.impl_info_str();
    InitSlot(e->in[0], DNNL_ARG_SRC, src_u, fwd_pd.src_desc(), true);
    InitSlot(e->in[1], DNNL_ARG_WEIGHTS, wei_u, fwd_pd.weights_desc(), true);
    InitSlot(e->out, DNNL_ARG_DST, dst_u, fwd_pd.dst_desc(), false);
    scratch_md = fwd_pd.scratchpad_desc();
  } else if (k.op == kBwdData) {
#if DNNL_VERSION_MAJOR >= 3
    auto pd = dnnl::convolution_backward_data::primitive_desc(eng, algo, src, wei, dst, strides,
                                                              pads, pads, fwd_pd, attr);
#else
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(algo, src, wei, dst, strides, pads, pads), attr,
        eng, fwd_pd);
#endif
    e->prim = dnnl::convolution_backward_data(pd);
    e->impl = pd.impl_info_str();
    InitSlot(e->in[0], DNNL_ARG_DIFF_DST, dst_u, pd.diff_dst_desc(), true);
    InitSlot(e->in[1], DNNL_ARG_WEIGHTS, wei_u, pd.weights_desc(), true);
    InitSlot(e->out, DNNL_ARG_DIFF_SRC, src_u, pd.diff_src_desc(), false);
    scratch_md = pd.scratchpad_desc();
  } else {
#if DNNL_VERSION_MAJOR >= 3
    auto pd = dnnl::convolution_backward_weights::primitive_desc(eng, algo, src, wei, dst,
                                                                 strides, pads, pads, fwd_pd, attr);
#else
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(algo, src, wei, dst, strides, pads, pads), attr,
        eng, fwd_pd);
#endif
    e->prim = dnnl::convolution_backward_weights(pd);
    e->impl = pd.impl_info_str();
    InitSlot(e->in[0], DNNL_ARG_SRC, src_u, pd.src_desc(), true);
    InitSlot(e->in[1], DNNL_ARG_DIFF_DST, dst_u, pd.diff_dst_desc(), true);
    InitSlot(e->out, DNNL_ARG_DIFF_WEIGHTS, wei_u, pd.diff_weights_desc(), false);
    scratch_md = pd.scratchpad_desc();
  }
  e->scratch = memory(scratch_md, eng);
  return e;
}

// OpenMP runtime: oneDNN parallelises over omp_get_max_threads() of the calling thread (an XLA
// worker), an ICV of that thread; set it once per thread from FER_JAX_ONEDNN_CONV_THREADS. Each
// distinct calling thread gets its own OpenMP team (libgomp), idle (spin-then-sleep,
// GOMP_SPINCOUNT) between calls. No-op for the other runtimes (TBB, ...).
void SetThreads() {
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
  thread_local bool done = false;
  if (done) return;
  done = true;
  static const int n = [] {
    const char* v = std::getenv("FER_JAX_ONEDNN_CONV_THREADS");
    return v ? std::atoi(v) : 0;
  }();
  if (n > 0) omp_set_num_threads(n);
#endif
}

Entry* Lookup(const Key& k) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  auto it = g_cache.find(k);
  if (it == g_cache.end()) it = g_cache.emplace(k, Build(k)).first;
  return it->second.get();
}

ffi::Error Run(Op op, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               int64_t stride, int64_t padding) {
  const auto da = a.dimensions(), db = b.dimensions(), dout = out->dimensions();
  if (da.size() != 4 || db.size() != 4 || dout.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: want rank-4 operands and result");
  const auto& x = op == kBwdData ? dout : da;                        // (N,H,W,Ci)
  const auto& w = op == kBwdWeights ? dout : db;                     // (KH,KW,Ci,Co)
  const auto& y = op == kFwd ? dout : (op == kBwdData ? da : db);    // (N,Ho,Wo,Co)
  const dt in_t = ToDnnl(a.element_type()), out_t = ToDnnl(out->element_type());
  if (in_t == dt::undef || out_t == dt::undef || b.element_type() != a.element_type())
    return ffi::Error::InvalidArgument("onednn_conv: operands f32 or bf16 (both alike)");
  Key k{op,
        static_cast<int>(x[0]),
        static_cast<int>(x[1]),
        static_cast<int>(x[2]),
        static_cast<int>(x[3]),
        static_cast<int>(w[3]),
        static_cast<int>(w[0]),
        static_cast<int>(w[1]),
        static_cast<int>(stride),
        static_cast<int>(padding),
        static_cast<int>(in_t),
        static_cast<int>(out_t)};
  if (w[2] != x[3] || y[0] != x[0] || y[3] != w[3] ||
      y[1] != (x[1] + 2 * padding - w[0]) / stride + 1 ||
      y[2] != (x[2] + 2 * padding - w[1]) / stride + 1)
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  SetThreads();
  try {
    Entry* e = Lookup(k);
    std::lock_guard<std::mutex> lock(e->mu);
    auto& eng = Engine();
    auto& s = Stream();
    std::unordered_map<int, memory> args;
    void* ptrs[2] = {a.untyped_data(), b.untyped_data()};
    for (int i = 0; i < 2; ++i) {
      Slot& sl = e->in[i];
      memory user(sl.user_md, eng, ptrs[i]);
      if (sl.needs_reorder) {
        sl.reorder.execute(s, user, sl.prim_mem);
        args.emplace(sl.arg, sl.prim_mem);
      } else {
        args.emplace(sl.arg, user);
      }
    }
    memory user_out(e->out.user_md, eng, out->untyped_data());
    args.emplace(e->out.arg, e->out.needs_reorder ? e->out.prim_mem : user_out);
    args.emplace(DNNL_ARG_SCRATCHPAD, e->scratch);
    e->prim.execute(s, args);
    if (e->out.needs_reorder) e->out.reorder.execute(s, e->out.prim_mem, user_out);
    s.wait();
    ++e->calls;
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t s,
               int64_t p) {
  return Run(kFwd, a, b, out, s, p);
}
ffi::Error BwdData(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                   int64_t s, int64_t p) {
  return Run(kBwdData, a, b, out, s, p);
}
ffi::Error BwdWeights(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                      int64_t s, int64_t p) {
  return Run(kBwdWeights, a, b, out, s, p);
}

std::string FormatMd(const memory::desc& md) {
  // Strides of the dims in (N/O, C/I, H, W) order and whether the layout is blocked.
  std::ostringstream o;
#if DNNL_VERSION_MAJOR >= 3
  o << (md.get_inner_nblks() > 0 ? "blocked" : "plain") << "[";
  auto st = md.get_strides();
  for (size_t i = 0; i < st.size(); ++i) o << (i ? "," : "") << st[i];
#else
  const auto& blk = md.data.format_desc.blocking;
  o << (blk.inner_nblks > 0 ? "blocked" : "plain") << "[";
  for (int i = 0; i < md.data.ndims; ++i) o << (i ? "," : "") << blk.strides[i];
#endif
  o << "]";
  return o.str();
}

}  // namespace

#define EXPORT __attribute__((visibility("default")))

#define BIND                                                                       \
  ffi::Ffi::Bind()                                                                 \
      .Arg<ffi::AnyBuffer>()                                                       \
      .Arg<ffi::AnyBuffer>()                                                       \
      .Ret<ffi::AnyBuffer>()                                                       \
      .Attr<int64_t>("stride")                                                     \
      .Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, Fwd, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, BwdData, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdWeights, BwdWeights, BIND);

// Writes one line per cached primitive (op, shape, dtypes, oneDNN's implementation, formats of
// the primitive's operands/result, which need reorders, calls) into buf; returns the length
// it needed (call again with a larger buffer if that is >= len).
extern "C" EXPORT int onednn_conv_info(char* buf, int len) {
  std::ostringstream o;
  std::lock_guard<std::mutex> lock(g_cache_mu);
  for (auto& [k, e] : g_cache) {
    o << kOpNames[k.op] << " n" << k.n << " " << k.h << "x" << k.w << "x" << k.ci << "->" << k.co
      << " " << k.kh << "x" << k.kw << " s" << k.stride << " p" << k.pad
      << " in=" << (k.src_dt == static_cast<int>(dt::bf16) ? "bf16" : "f32")
      << " out=" << (k.dst_dt == static_cast<int>(dt::bf16) ? "bf16" : "f32")
      << " impl=" << e->impl;
    const Slot* slots[3] = {&e->in[0], &e->in[1], &e->out};
    for (const Slot* s : slots)
      o << " " << (s->needs_reorder ? "REORDER:" : "") << FormatMd(s->prim_md);
    o << " scratch=" << e->scratch.get_desc().get_size() << "B calls=" << e->calls << "\n";
  }
  std::string str = o.str();
  std::snprintf(buf, len, "%s", str.c_str());
  return static_cast<int>(str.size());
}

// "major.minor.patch runtime" of the oneDNN library loaded at run time.
extern "C" EXPORT int onednn_conv_version(char* buf, int len) {
  const dnnl_version_t* v = dnnl_version();
  const char* rt = v->cpu_runtime == DNNL_RUNTIME_OMP    ? "omp"
                   : v->cpu_runtime == DNNL_RUNTIME_TBB  ? "tbb"
                   : v->cpu_runtime == DNNL_RUNTIME_SEQ  ? "seq"
                                                         : "other";
  return std::snprintf(buf, len, "%d.%d.%d %s", v->major, v->minor, v->patch, rt);
}

// 1 where oneDNN has bfloat16 convolutions (forward and both gradients) on this CPU, else 0:
// oneDNN 2.x has them on AVX-512 CPUs only (on AVX2 creating their primitive descriptor fails).
extern "C" EXPORT int onednn_conv_bf16_supported() {
  const int bf16 = static_cast<int>(dt::bf16), f32 = static_cast<int>(dt::f32);
  try {
    for (int op : {kFwd, kBwdData, kBwdWeights})
      Build(Key{op, 1, 8, 8, 16, 16, 3, 3, 1, 1, bf16, f32});
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}

// Threads oneDNN would use for a call from the calling thread (OpenMP runtime), -1 otherwise.
extern "C" EXPORT int onednn_conv_max_threads() {
  SetThreads();
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
  return omp_get_max_threads();
#else
  return -1;
#endif
}
