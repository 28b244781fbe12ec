"""
scan_kernel_cpu.py: the selective scan's CPU kernels as C++ source (backend "cpu" of scan_kernel.py),
and their build. Optional, as Triton is: without this file scan_kernel.py runs the PyTorch path.

Built at first use by the C++ toolchain torch.compile uses (torch._inductor's code cache: the same
compiler, flags and vector headers as Inductor's own kernels; no other build step). The source is
kept in a .py file so that a flat install (pyproject.toml's py-modules) and a copy of the files
both carry it. scan_kernel.py holds the Python side: the layouts, the autograd Function and the
backward's last sums (`_SelectiveScanCPU`).

Why not Inductor-generated code: Inductor cannot keep the N-state in registers across steps
and also reduce it (sum_n x C) in the same loop, so every chunk materialises (T, b, D, N)
temporaries, and the (batch, D, L) <-> (L, batch, D) layout changes around the chunks cost as
much as the recurrence. Here one loop iteration owns VL channels (VL = the vector width: 8
fp32 on AVX2, 16 on AVX-512) of one batch row, vectorised over those channels, with the N
states of each channel in N vectors for all L steps; u, Δ, z are read in (VL x T) tiles of
their (batch, D, L) layout, B and C (transposed once to (batch, G, L, N)) as broadcasts.
OpenMP threads take the (batch row, group, channel split) work items.

Forward: the recurrence, y = sum_n x C + D u, the gate, and the state before every chunk of
T steps (the chunk starts, (batch, D, n_chunks, N)). Backward, chunk by chunk in reverse: the
chunk's states and exp(ΔA) recomputed from its start into an L1-sized buffer, then the
reverse scan dh_t = g_t C_t + exp(Δ_{t+1} A) dh_{t+1} and every gradient in the same pass.
dB and dC are sums over a group's channels: each work item sums its channel vectors lane-wise
(an (L, N) buffer of vectors), adds the lanes once at its end into its own slice of a
(batch, G, splits, L, N) buffer, and the splits are summed afterwards; dA and dD likewise over
the batch. The arithmetic is fp32 (fp16/bf16 inputs are cast first; fp64 takes the PyTorch path).

Names: FWD, BWD (the two kernels' source, `%`-formatted with N and T), COMMON (what both share:
the exp2 polynomial, softplus, sigmoid, tile loads; experiments/bench_scan.py's floor reuses it),
SIGNATURES (their argument types), build(kind, N, T), library_is_whole(path) (a damaged cached binary is
rebuilt, not loaded).
"""
import os
import struct
import sys
import warnings

CPU_CHUNK = 16             # T: steps per chunk of the C++ kernels (one saved chunk start each)

COMMON = r'''
#include <torch/csrc/inductor/cpp_prefix.h>
using Vec = at::vec::Vectorized<float>;
constexpr int64_t N = %(N)d;            // states per channel (a compile-time constant: one build per N)
constexpr int64_t T = %(T)d;            // steps per chunk
constexpr int64_t VL = Vec::size();     // channels per vector
constexpr float LN2 = 0.6931471805599453f;
// 2^x: on AVX2 / AVX-512 inline, as 2^round(x) (built in the exponent bits) times a degree-6
// polynomial of 2^f on [-1/2, 1/2] (relative error < 2e-7; x clamped to [-126, 126]); elsewhere
// at::vec's exp2 (Sleef, a call). Both the kernels and the floor use it.
static inline Vec exp2v(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    const Vec v = at::vec::minimum(at::vec::maximum(x, Vec(-126.f)), Vec(126.f));
    const Vec r = v.round(), f = v - r;
    Vec p(1.5403530393381609e-4f);
    p = at::vec::fmadd(p, f, Vec(1.3333558146428443e-3f));
    p = at::vec::fmadd(p, f, Vec(9.618129107628477e-3f));
    p = at::vec::fmadd(p, f, Vec(5.550410866482158e-2f));
    p = at::vec::fmadd(p, f, Vec(0.2402265069591007f));
    p = at::vec::fmadd(p, f, Vec(0.6931471805599453f));
    p = at::vec::fmadd(p, f, Vec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
    return p * Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(r),
                                                                          _mm512_set1_epi32(127)), 23)));
#else
    return p * Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r),
                                                                          _mm256_set1_epi32(127)), 23)));
#endif
#else
    return x.exp2();
#endif
}
static inline Vec softplus(const Vec& x) { return Vec::blendv(x.exp().log1p(), x, x > Vec(20.f)); }
static inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }
static inline float hsum(const Vec& x) {
    return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, x);
}
// a (T steps) x (VL channels) tile of the rows src[c * L + t0 + t], c < nc, t < nt: buf[t * VL + c], zero elsewhere
static inline void load_tile(const float* src, int64_t L, int64_t t0, int64_t nt, int64_t nc, float* buf) {
    for (int64_t i = 0; i < T * VL; i++) buf[i] = 0.f;
    for (int64_t c = 0; c < nc; c++) for (int64_t t = 0; t < nt; t++) buf[t * VL + c] = src[c * L + t0 + t];
}
static inline void store_tile(float* dst, int64_t L, int64_t t0, int64_t nt, int64_t nc, const float* buf) {
    for (int64_t c = 0; c < nc; c++) for (int64_t t = 0; t < nt; t++) dst[c * L + t0 + t] = buf[t * VL + c];
}
// channel values p[c * stride], c < nc, as one vector (zero in the unused lanes)
static inline Vec gather(const float* p, int64_t stride, int64_t nc) {
    alignas(64) float lane[VL] = {0.f};
    for (int64_t c = 0; c < nc; c++) lane[c] = p[c * stride];
    return Vec::loadu(lane);
}
static inline void scatter(const Vec& v, float* p, int64_t stride, int64_t nc) {
    alignas(64) float lane[VL];
    v.store(lane);
    for (int64_t c = 0; c < nc; c++) p[c * stride] = lane[c];
}
// work item w -> batch row b, group g, channels [d0, d0 + nc) of split s (splits of whole vectors)
#define WORK_ITEM                                                                              \
    const int64_t Dg = dim / G, nvec = (Dg + VL - 1) / VL, per = (nvec + S - 1) / S;            \
    const int64_t b = w / (G * S), g = (w / S) %% G, s = w %% S;                                 \
    const float* Bn0 = Bt + (b * G + g) * L * N; const float* Cn0 = Ct + (b * G + g) * L * N;
'''

FWD = COMMON + r'''
extern "C" void kernel(const float* u, const float* delta, const float* A2t, const float* Bt, const float* Ct,
                       const float* Dskip, const float* z, const float* bias, float* out, float* starts, float* last,
                       int64_t batch, int64_t dim, int64_t L, int64_t G, int64_t S, int64_t flags) {
    const bool has_D = flags & 1, has_z = flags & 2, has_bias = flags & 4, sp = flags & 8;
    const int64_t n_chunks = (L + T - 1) / T;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < batch * G * S; w++) {
        WORK_ITEM
        for (int64_t v = s * per; v < std::min(nvec, (s + 1) * per); v++) {
            const int64_t d0 = g * Dg + v * VL, nc = std::min(VL, g * Dg + Dg - d0), row = (b * dim + d0) * L;
            Vec a[N], x[N];                                                   // A log2(e), and the state
            for (int64_t n = 0; n < N; n++) { a[n] = gather(A2t + n * dim + d0, 1, nc); x[n] = Vec(0.f); }
            const Vec vbias = has_bias ? gather(bias + d0, 1, nc) : Vec(0.f);
            const Vec vD = has_D ? gather(Dskip + d0, 1, nc) : Vec(0.f);
            alignas(64) float dtb[T * VL], ub[T * VL], yb[T * VL];
            for (int64_t k = 0; k < n_chunks; k++) {
                const int64_t t0 = k * T, nt = std::min(T, L - t0);
                for (int64_t n = 0; n < N; n++)                               // chunk start: (batch, D, n_chunks, N)
                    scatter(x[n], starts + ((b * dim + d0) * n_chunks + k) * N + n, n_chunks * N, nc);
                load_tile(delta + row, L, t0, nt, nc, dtb);
                load_tile(u + row, L, t0, nt, nc, ub);
                for (int64_t t = 0; t < nt; t++) {
                    Vec dt = Vec::loadu(dtb + t * VL) + vbias;
                    if (sp) dt = softplus(dt);                                // Δ
                    const Vec uu = Vec::loadu(ub + t * VL), dtu = dt * uu;
                    const float* Bn = Bn0 + (t0 + t) * N; const float* Cn = Cn0 + (t0 + t) * N;
                    Vec y[4] = {vD * uu, Vec(0.f), Vec(0.f), Vec(0.f)};      // 4 partial sums: short add chains
                    for (int64_t n = 0; n < N; n++) {
                        x[n] = at::vec::fmadd(exp2v(a[n] * dt), x[n], dtu * Vec(Bn[n]));  // exp(ΔA) x + ΔBu
                        y[n %% 4] = at::vec::fmadd(x[n], Vec(Cn[n]), y[n %% 4]);            // y_t = sum_n x C + D u
                    }
                    ((y[0] + y[1]) + (y[2] + y[3])).store(yb + t * VL);
                }
                if (has_z) {                                                  // out = y silu(z)
                    load_tile(z + row, L, t0, nt, nc, dtb);
                    for (int64_t t = 0; t < nt; t++) {
                        const Vec zz = Vec::loadu(dtb + t * VL);
                        (Vec::loadu(yb + t * VL) * zz * sigmoid(zz)).store(yb + t * VL);
                    }
                }
                store_tile(out + row, L, t0, nt, nc, yb);
            }
            for (int64_t n = 0; n < N; n++) scatter(x[n], last + (b * dim + d0) * N + n, N, nc);   // (batch, D, N)
        }
    }
}
'''

BWD = COMMON + r'''
extern "C" void kernel(const float* u, const float* delta, const float* A2t, const float* Bt, const float* Ct,
                       const float* Dskip, const float* z, const float* bias, const float* starts, const float* dout,
                       float* du, float* ddelta, float* dz, float* dBs, float* dCs, float* dAb, float* dDb,
                       int64_t batch, int64_t dim, int64_t L, int64_t G, int64_t S, int64_t flags) {
    const bool has_D = flags & 1, has_z = flags & 2, has_bias = flags & 4, sp = flags & 8;
    const int64_t n_chunks = (L + T - 1) / T;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < batch * G * S; w++) {
        WORK_ITEM
        float* dBw = dBs + ((b * G + g) * S + s) * L * N;                     // this item's part of dB, dC: (L, N)
        float* dCw = dCs + ((b * G + g) * S + s) * L * N;
        std::vector<Vec> sumB(L * N, Vec(0.f)), sumC(L * N, Vec(0.f));       // over its channel vectors, lane-wise
        for (int64_t v = s * per; v < std::min(nvec, (s + 1) * per); v++) {
            const int64_t d0 = g * Dg + v * VL, nc = std::min(VL, g * Dg + Dg - d0), row = (b * dim + d0) * L;
            Vec a[N], dh[N], dA_sum[N];
            for (int64_t n = 0; n < N; n++) {
                a[n] = gather(A2t + n * dim + d0, 1, nc); dh[n] = Vec(0.f); dA_sum[n] = Vec(0.f);
            }
            const Vec vbias = has_bias ? gather(bias + d0, 1, nc) : Vec(0.f);
            const Vec vD = has_D ? gather(Dskip + d0, 1, nc) : Vec(0.f);
            Vec dD_sum(0.f);
            alignas(64) float db[T * VL], ub[T * VL], gb[T * VL], zb[T * VL], o1[T * VL], o2[T * VL], o3[T * VL];
            alignas(64) float dtb[T * VL];                                    // Δ, from the recompute
            alignas(64) float xs[(T + 1) * N * VL], eA[T * N * VL];  // the chunk: x0 and its states, exp(ΔA)
            for (int64_t k = n_chunks - 1; k >= 0; k--) {
                const int64_t t0 = k * T, nt = std::min(T, L - t0);
                load_tile(delta + row, L, t0, nt, nc, db);
                load_tile(u + row, L, t0, nt, nc, ub);
                load_tile(dout + row, L, t0, nt, nc, gb);
                if (has_z) load_tile(z + row, L, t0, nt, nc, zb);
                for (int64_t n = 0; n < N; n++)
                    gather(starts + ((b * dim + d0) * n_chunks + k) * N + n, n_chunks * N, nc).store(xs + n * VL);
                for (int64_t t = 0; t < nt; t++) {                           // the chunk forward again, from its start
                    Vec dt = Vec::loadu(db + t * VL) + vbias;
                    if (sp) dt = softplus(dt);
                    dt.store(dtb + t * VL);
                    const Vec dtu = dt * Vec::loadu(ub + t * VL);
                    const float* Bn = Bn0 + (t0 + t) * N;
                    for (int64_t n = 0; n < N; n++) {
                        const Vec e = exp2v(a[n] * dt);
                        e.store(eA + (t * N + n) * VL);
                        const Vec x = at::vec::fmadd(e, Vec::loadu(xs + (t * N + n) * VL), dtu * Vec(Bn[n]));
                        x.store(xs + ((t + 1) * N + n) * VL);
                    }
                }
                for (int64_t t = nt - 1; t >= 0; t--) {                      // the reverse scan
                    const Vec raw = Vec::loadu(db + t * VL) + vbias, dt = Vec::loadu(dtb + t * VL);
                    const Vec uu = Vec::loadu(ub + t * VL), go = Vec::loadu(gb + t * VL), dtu = dt * uu;
                    const Vec zz = has_z ? Vec::loadu(zb + t * VL) : Vec(0.f), sz = has_z ? sigmoid(zz) : Vec(1.f);
                    const Vec gy = has_z ? go * zz * sz : go;                 // dL/dy
                    const float* Bn = Bn0 + (t0 + t) * N; const float* Cn = Cn0 + (t0 + t) * N;
                    Vec* sB = sumB.data() + (t0 + t) * N; Vec* sC = sumC.data() + (t0 + t) * N;
                    Vec wA[2] = {Vec(0.f), Vec(0.f)}, hB[2] = {Vec(0.f), Vec(0.f)}, y[2] = {vD * uu, Vec(0.f)};
                    for (int64_t n = 0; n < N; n++) {
                        const Vec xt = Vec::loadu(xs + ((t + 1) * N + n) * VL), xp = Vec::loadu(xs + (t * N + n) * VL);
                        const Vec e = Vec::loadu(eA + (t * N + n) * VL), vB(Bn[n]), vC(Cn[n]);
                        dh[n] = at::vec::fmadd(gy, vC, dh[n]);               // dh_t = g_t C_t + carry
                        const Vec wn = dh[n] * e * xp;                        // dh · exp(Δ_t A) x_{t-1}
                        wA[n & 1] = at::vec::fmadd(wn, a[n], wA[n & 1]);      // sum_n dh exp(ΔA) x A log2(e)
                        dA_sum[n] = at::vec::fmadd(wn, dt, dA_sum[n]);
                        hB[n & 1] = at::vec::fmadd(dh[n], vB, hB[n & 1]);     // sum_n dh B
                        y[n & 1] = at::vec::fmadd(xt, vC, y[n & 1]);          // y_t, for dz
                        sB[n] = at::vec::fmadd(dh[n], dtu, sB[n]);            // dB, dC: sums over the channels
                        sC[n] = at::vec::fmadd(xt, gy, sC[n]);
                        dh[n] = dh[n] * e;                                    // the carry into step t - 1
                    }
                    const Vec dhB = hB[0] + hB[1];
                    Vec ddt = (wA[0] + wA[1]) * Vec(LN2) + uu * dhB;         // dL/dΔ
                    (dt * dhB + gy * vD).store(o1 + t * VL);                  // du
                    dD_sum = at::vec::fmadd(gy, uu, dD_sum);
                    if (has_z) (go * (y[0] + y[1]) * sz * (Vec(1.f) + zz * (Vec(1.f) - sz))).store(o3 + t * VL);
                    if (sp) ddt = ddt * Vec::blendv(sigmoid(raw), Vec(1.f), raw > Vec(20.f));
                    ddt.store(o2 + t * VL);
                }
                store_tile(du + row, L, t0, nt, nc, o1);
                store_tile(ddelta + row, L, t0, nt, nc, o2);
                if (has_z) store_tile(dz + row, L, t0, nt, nc, o3);
            }
            for (int64_t n = 0; n < N; n++) scatter(dA_sum[n], dAb + (b * dim + d0) * N + n, N, nc);   // (batch, D, N)
            scatter(dD_sum, dDb + b * dim + d0, 1, nc);                                       // (batch, D)
        }
        for (int64_t i = 0; i < L * N; i++) { dBw[i] = hsum(sumB[i]); dCw[i] = hsum(sumC[i]); }   // lanes: summed once
    }
}
'''

SIGNATURES = {   # the pybinding's argument types: inputs, outputs, then the six int64 sizes and flags
    "fwd": ["const float*"] * 8 + ["float*"] * 3 + ["int64_t"] * 6,
    "bwd": ["const float*"] * 10 + ["float*"] * 7 + ["int64_t"] * 6,
}


def library_is_whole(path):
    """Whether the shared library at path is complete: an ELF file whose every segment and section
    table lie inside it. A build killed while writing, or a full disk, leaves a truncated file in
    the cache, which the loader maps and then faults on (a bus error that kills the process, no
    message). Files of other formats (macOS) are not checked."""
    with open(path, "rb") as f:
        data = f.read()
    if not sys.platform.startswith("linux"):
        return True
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:   # 64-bit little-endian ELF
        return False
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return False
    segments = (struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum))
    return all(offset + filesz <= len(data) for _, _, offset, _, _, filesz in segments)


def build(kind, N, T=CPU_CHUNK):
    """The forward ("fwd") or backward ("bwd") kernel for state size N and chunk T, compiled (a few
    seconds; Inductor caches the binary on disk) and loaded as a Python callable. A cached binary
    that is not whole (library_is_whole) is deleted and built again, with a warning naming it.
    Raises whatever the toolchain raises; scan_kernel._cpu_kernel turns that into one message."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class Checked(CppPythonBindingsCodeCache):     # Inductor's loader, with the binary checked before it maps it
        @classmethod
        def _load_library(cls, path, key):
            if not library_is_whole(path):
                os.remove(path)
                warnings.warn(f"the C++ scan kernel cached at {path} was damaged (truncated: a build killed while "
                              f"writing, or a full disk); deleted and built again", stacklevel=2)
                raise _Rebuild
            LIBRARIES[kind, N, T] = path
            return super()._load_library(path, key)

    src = (FWD if kind == "fwd" else BWD) % dict(N=N, T=T)
    try:
        return Checked.load_pybinding(SIGNATURES[kind], src)
    except _Rebuild:                               # the same cache entry compiles again: its binary is gone
        return Checked.load_pybinding(SIGNATURES[kind], src)


LIBRARIES = {}             # (kind, N, T) -> the cached binary this process loaded


class _Rebuild(Exception):
    """A damaged cached binary was deleted: build() loads once more."""
