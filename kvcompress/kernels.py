"""Native CPU kernel for the quantized read: one pass from packed codes to keys and values in slot order.

`QuantizedKV.read` (kvcompress/storage.py) turns one layer's pages into (B, Hkv, used, d) keys and values each time
the layer is attended. In torch operations that is a page gather, a shift-and-mask per code position, a conversion,
a multiply by the scale, an add of the zero point and an index_put of the full-precision pages: five or six passes
over the output. `read_pages` does it in one: for every (row, kv head, page) of the table it writes the page's
slots straight from the codes (quantized page), from the full-precision pool (page >= 0), or zeros (no page).

Bitwise the torch path's result: each element is `T(T(code * scale) + zero)` with the product and the sum each
rounded to the output dtype T as the torch operations round them (computed in float for half types, as torch's CPU
kernels do; no fused multiply-add: built with -ffp-contract=off).

Built on first use with `torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja; 20-60 s once, then
cached in TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions). Where it cannot be built, or with
`KVCOMPRESS_NATIVE=0`, `available()` is False and the storage keeps its torch path (same result, slower); the reason
is in `unavailable_reason()`. CPU tensors only.
"""

from __future__ import annotations

import os
import threading
import warnings

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <cstring>
#include <type_traits>
#include <vector>

// one row of `count` elements from its codes (packed BITS to a byte, first code in the low bits):
// out[c] = T(T(code * scale) + zero), each step rounded to T as torch's mul_ then add_ in T round it; scale and zero
// per element (PER_CHANNEL: keys) or one for the row (values), already rounded to T and held in T's math type A
template <int BITS, bool PER_CHANNEL, typename T, typename A>
static inline void dequant_row(const uint8_t* codes, int64_t count, const A* scale, const A* zero, T* out) {
  constexpr int per_byte = 8 / BITS;
  constexpr int mask = (1 << BITS) - 1;
  auto one = [&](int64_t c, int code) {
    const A s = PER_CHANNEL ? scale[c] : scale[0], z = PER_CHANNEL ? zero[c] : zero[0];
    if constexpr (std::is_same_v<T, A>) out[c] = static_cast<A>(code) * s + z;
    else out[c] = static_cast<T>(static_cast<A>(static_cast<T>(static_cast<A>(code) * s)) + z);
  };
  const int64_t whole = count / per_byte;
  for (int64_t j = 0; j < whole; ++j) {
    const int byte = codes[j];
    for (int i = 0; i < per_byte; ++i) one(j * per_byte + i, (byte >> (i * BITS)) & mask);
  }
  for (int64_t c = whole * per_byte; c < count; ++c) one(c, (codes[c / per_byte] >> ((c % per_byte) * BITS)) & mask);
}

template <typename T, typename S>
static inline at::opmath_type<T> as_t(S x) {  // a stored scale or zero, rounded to T, in T's math type
  return static_cast<at::opmath_type<T>>(static_cast<T>(x));
}

template <int BITS, typename T, typename S>
static void read_pages_impl(const at::Tensor& entry, const at::Tensor& kcodes, const at::Tensor& kscale,
                            const at::Tensor& kzero, const at::Tensor& vcodes, const at::Tensor& vscale,
                            const at::Tensor& vzero, const at::Tensor& kpool, const at::Tensor& vpool,
                            at::Tensor& keys, at::Tensor& values, int64_t used) {
  using A = at::opmath_type<T>;
  const int64_t lanes = entry.size(0) * entry.size(1), pages = entry.size(2);
  const int64_t page = kpool.size(1), d = kpool.size(2), dv = vpool.size(2);
  const int64_t groups = vscale.size(2), group = dv / groups;
  const int64_t kbytes = kcodes.size(2), vbytes = vcodes.size(3);
  const int64_t* table = entry.data_ptr<int64_t>();
  const uint8_t* kc = kcodes.data_ptr<uint8_t>();
  const uint8_t* vc = vcodes.data_ptr<uint8_t>();
  const S* ks = kscale.data_ptr<S>();
  const S* kz = kzero.data_ptr<S>();
  const S* vs = vscale.data_ptr<S>();
  const S* vz = vzero.data_ptr<S>();
  const T* kp = kpool.data_ptr<T>();
  const T* vp = vpool.data_ptr<T>();
  T* ko = keys.data_ptr<T>();
  T* vo = values.data_ptr<T>();
  at::parallel_for(0, lanes * pages, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scale(d), zero(d);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t lane = i / pages, p = i % pages, e = table[i];
      const int64_t first = p * page, count = std::min(page, used - first);
      T* kout = ko + (lane * used + first) * d;
      T* vout = vo + (lane * used + first) * dv;
      if (e >= 0) {  // full-precision page
        std::memcpy(kout, kp + e * page * d, count * d * sizeof(T));
        std::memcpy(vout, vp + e * page * dv, count * dv * sizeof(T));
      } else if (e == -1) {  // no page: zeros
        std::fill(kout, kout + count * d, static_cast<T>(0));
        std::fill(vout, vout + count * dv, static_cast<T>(0));
      } else {  // quantized page q = -(e + 2): keys per channel, values per token in groups of channels
        const int64_t q = -e - 2;
        for (int64_t c = 0; c < d; ++c) {
          scale[c] = as_t<T, S>(ks[q * d + c]);
          zero[c] = as_t<T, S>(kz[q * d + c]);
        }
        for (int64_t t = 0; t < count; ++t) {
          dequant_row<BITS, true, T, A>(kc + (q * page + t) * kbytes, d, scale.data(), zero.data(), kout + t * d);
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = (q * page + t) * groups + g;
            const A s = as_t<T, S>(vs[at]), z = as_t<T, S>(vz[at]);
            dequant_row<BITS, false, T, A>(vc + at * vbytes, group, &s, &z, vout + t * dv + g * group);
          }
        }
      }
    }
  });
}

template <typename T, typename S>
static void by_bits(int64_t bits, const at::Tensor& entry, const at::Tensor& kc, const at::Tensor& ks,
                    const at::Tensor& kz, const at::Tensor& vc, const at::Tensor& vs, const at::Tensor& vz,
                    const at::Tensor& kp, const at::Tensor& vp, at::Tensor& keys, at::Tensor& values, int64_t used) {
  if (bits == 8) read_pages_impl<8, T, S>(entry, kc, ks, kz, vc, vs, vz, kp, vp, keys, values, used);
  else if (bits == 4) read_pages_impl<4, T, S>(entry, kc, ks, kz, vc, vs, vz, kp, vp, keys, values, used);
  else if (bits == 2) read_pages_impl<2, T, S>(entry, kc, ks, kz, vc, vs, vz, kp, vp, keys, values, used);
  else TORCH_CHECK(false, "bits must be 8, 4 or 2, got ", bits);
}

std::vector<at::Tensor> read_pages(at::Tensor entry, at::Tensor kcodes, at::Tensor kscale, at::Tensor kzero,
                                   at::Tensor vcodes, at::Tensor vscale, at::Tensor vzero, at::Tensor kpool,
                                   at::Tensor vpool, int64_t bits, int64_t used) {
  TORCH_CHECK(entry.device().is_cpu() && kpool.device().is_cpu(), "read_pages: CPU tensors only");
  TORCH_CHECK(kscale.scalar_type() == vscale.scalar_type() && kzero.scalar_type() == kscale.scalar_type() &&
              vzero.scalar_type() == kscale.scalar_type(), "read_pages: scales and zeros of one dtype");
  TORCH_CHECK(kpool.scalar_type() == vpool.scalar_type(), "read_pages: key and value pools of one dtype");
  entry = entry.contiguous(); kcodes = kcodes.contiguous(); kscale = kscale.contiguous();
  kzero = kzero.contiguous(); vcodes = vcodes.contiguous(); vscale = vscale.contiguous();
  vzero = vzero.contiguous(); kpool = kpool.contiguous(); vpool = vpool.contiguous();
  TORCH_CHECK(entry.dim() == 3 && entry.scalar_type() == at::kLong, "read_pages: entry must be (B, Hkv, P) int64");
  TORCH_CHECK(used > (entry.size(2) - 1) * kpool.size(1) && used <= entry.size(2) * kpool.size(1),
              "read_pages: ", entry.size(2), " pages of ", kpool.size(1), " slots cannot hold used = ", used);
  TORCH_CHECK(kscale.size(0) == kcodes.size(0) && vcodes.size(0) == kcodes.size(0) && vscale.size(2) > 0 &&
              vpool.size(2) % vscale.size(2) == 0, "read_pages: inconsistent code, scale and pool shapes");
  const int64_t* table = entry.data_ptr<int64_t>();
  for (int64_t i = 0; i < entry.numel(); ++i)  // no read outside the pools, whatever the table holds (IndexError)
    TORCH_CHECK_INDEX(table[i] < kpool.size(0) && -table[i] - 2 < kcodes.size(0), "read_pages: table entry ", table[i],
                " names no page (", kpool.size(0), " full-precision, ", kcodes.size(0), " quantized)");
  auto keys = at::empty({entry.size(0), entry.size(1), used, kpool.size(2)}, kpool.options());
  auto values = at::empty({entry.size(0), entry.size(1), used, vpool.size(2)}, vpool.options());
  const auto dtype = kpool.scalar_type();
  const auto stored = kscale.scalar_type();
  #define KVC_CASE(T, S) by_bits<T, S>(bits, entry, kcodes, kscale, kzero, vcodes, vscale, vzero, kpool, vpool, \
                                       keys, values, used)
  if (stored == at::kHalf) {
    if (dtype == at::kFloat) KVC_CASE(float, at::Half);
    else if (dtype == at::kDouble) KVC_CASE(double, at::Half);
    else if (dtype == at::kHalf) KVC_CASE(at::Half, at::Half);
    else TORCH_CHECK(false, "read_pages: unsupported pool dtype ", dtype);
  } else if (stored == at::kBFloat16 && dtype == at::kBFloat16) {
    KVC_CASE(at::BFloat16, at::BFloat16);
  } else {
    TORCH_CHECK(false, "read_pages: unsupported scale dtype ", stored, " for pools of ", dtype);
  }
  #undef KVC_CASE
  return {keys, values};
}
"""

_NAME = "kvcompress_read_pages_v7"  # a new name whenever _SOURCE changes (the build cache is keyed by name)
_lock = threading.Lock()
_module = None
_failure: str | None = None


def build(source: str = _SOURCE, name: str = _NAME):
    """Compile `source` (a C++ translation unit defining `read_pages`) into an extension module, or raise."""
    from torch.utils.cpp_extension import load_inline

    try:  # the `ninja` wheel's binary, also when the environment's bin folder is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    return load_inline(name=name, cpp_sources=source, functions=["read_pages"],
                       extra_cflags=["-O3", "-ffp-contract=off"], verbose=False)


def _build() -> None:
    global _module, _failure
    with _lock:
        if _module is not None or _failure is not None:
            return
        if os.environ.get("KVCOMPRESS_NATIVE", "1") == "0":
            _failure = "turned off by KVCOMPRESS_NATIVE=0"
            return
        try:
            _module = build()
        except Exception as error:  # no compiler, no ninja, a build error: the torch path serves
            lines = str(error).strip().splitlines()
            _failure = f"{type(error).__name__}: {lines[-1] if lines else ''}"
            warnings.warn(f"kvcompress: the native quantized read could not be built ({_failure}); the torch path "
                          "is used (same result, slower decode steps with kv_bits)", RuntimeWarning, stacklevel=3)


def available() -> bool:
    """Whether the native read is built (building it on the first call)."""
    if _module is None and _failure is None:
        _build()
    return _module is not None


def unavailable_reason() -> str | None:
    available()
    return _failure


def read_pages(entry, quantized: dict, key_pool, value_pool, bits: int, used: int, module=None):
    """entry (B, Hkv, P) table entries (>= 0 full-precision page, -1 none, <= -2 quantized page -(e + 2)),
    `quantized` the store's code/scale/zero pools, pools (N, page, d): returns (B, Hkv, used, d) keys and
    (B, Hkv, used, dv) values in the pools' dtype. `module`: another build of the kernel (tests)."""
    q = quantized
    return (module or _module).read_pages(entry, q["keys"], q["key_scale"], q["key_zero"], q["values"],
                                          q["value_scale"].squeeze(-1), q["value_zero"].squeeze(-1), key_pool,
                                          value_pool, bits, used)
