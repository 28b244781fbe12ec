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
T steps (the chunk starts, (batch, D, n_chunks, N) held channel-fastest: one vector per (chunk,
state)). Backward, chunk by chunk in reverse: the chunk's states and exp(ΔA) recomputed from its
start into an L1-sized buffer, then the reverse scan dh_t = g_t C_t + exp(Δ_{t+1} A) dh_{t+1}
and every gradient in the same pass.
dB and dC are sums over a group's channels: each work item sums its channel vectors lane-wise
(an (L, N) buffer of vectors), adds the lanes once at its end into its own slice of a
(batch, G, splits, L, N) buffer, and the splits are summed afterwards; dA and dD likewise over
the batch. The arithmetic is fp32 (fp16/bf16 inputs are cast first; fp64 takes the PyTorch path).

Names: FWD, BWD (the two kernels' source, `%`-formatted with N and T); ORDERED_SCAN_FWD/_BWD,
ORDERED_CONV_FWD/_BWD, TOKEN_NORM_MEAN(_BWD), GATED_SUM(_BWD) and ROPE_RMS_NORM(_BWD) (the fused mixer's
kernels: scan_kernel.ordered_scan, ...);
COMMON (what all share: the exp2 polynomial, softplus, sigmoid, tile loads, Δ's low-rank row;
experiments/bench_scan.py's floor reuses it), CONV_COMMON and ROPE_COMMON (the conv's and RoPE's helpers),
SIGNATURES (their argument types), build(kind, N, T), library_is_whole(path) (a damaged cached binary is
rebuilt, not loaded).
"""
import os
import struct
import sys
import warnings

CPU_CHUNK = 16             # T: steps per chunk of the C++ kernels (one saved chunk start each)
ORDERED_CHUNK = 32         # T of the ordered scan (its backward ran 5-10% faster alone with 32 than 16 steps,
                           # ~2% in a training step; selective_scan's ~20% slower at train_mini's shape)

COMMON = r'''
#include <torch/csrc/inductor/cpp_prefix.h>
using Vec = at::vec::Vectorized<float>;
constexpr int64_t N = %(N)d;            // states per channel (a compile-time constant: one build per N)
constexpr int64_t T = %(T)d;            // steps per chunk
constexpr int64_t VL = Vec::size();     // channels per vector
constexpr float LN2 = 0.6931471805599453f;
// 2^x: on AVX2 / AVX-512 inline, as 2^round(x) times a degree-5 polynomial of 2^f on [-1/2, 1/2]
// (f = x - round(x); fitted to the relative error, 7.5e-8, and 2.2e-7 evaluated in fp32, as a degree-6
// Taylor-like fit was); elsewhere at::vec's exp2 (Sleef, a call). AVX-512 scales
// by 2^round(x) in one instruction (vscalefps: 0 below the smallest float, inf above the largest, so no
// clamp); AVX2 builds 2^round(x) in the exponent bits, x clamped to [-126, 126]. Both the kernels and
// the floor use it.
static inline Vec exp2v(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if defined(CPU_CAPABILITY_AVX512)
    const Vec& v = x;
#else
    const Vec v = at::vec::minimum(at::vec::maximum(x, Vec(-126.f)), Vec(126.f));
#endif
    const Vec r = v.round(), f = v - r;
    Vec p(1.3276457320898771e-3f);
    p = at::vec::fmadd(p, f, Vec(9.67553909868002e-3f));
    p = at::vec::fmadd(p, f, Vec(5.550713464617729e-2f));
    p = at::vec::fmadd(p, f, Vec(0.24022120237350464f));
    p = at::vec::fmadd(p, f, Vec(0.6931469440460205f));
    p = at::vec::fmadd(p, f, Vec(1.0000001192092896f));
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_scalef_ps(p, r));
#else
    return p * Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r),
                                                                          _mm256_set1_epi32(127)), 23)));
#endif
#else
    return x.exp2();
#endif
}
constexpr float LOG2E = 1.4426950408889634f;
// log(1 + e) for e in [0, 1], inline: 2 atanh(s) = 2 (s + s^3/3 + ... + s^13/13), s = e / (2 + e) <= 1/3
// (the series' tail < 2e-8 relative; a few ulp in all, relative also where e is tiny)
static inline Vec log1p_unit(const Vec& e) {
    const Vec s = e / (Vec(2.f) + e), s2 = s * s;
    Vec p(2.f / 13.f);
    p = at::vec::fmadd(p, s2, Vec(2.f / 11.f));
    p = at::vec::fmadd(p, s2, Vec(2.f / 9.f));
    p = at::vec::fmadd(p, s2, Vec(2.f / 7.f));
    p = at::vec::fmadd(p, s2, Vec(2.f / 5.f));
    p = at::vec::fmadd(p, s2, Vec(2.f / 3.f));
    p = at::vec::fmadd(p, s2, Vec(2.f));
    return p * s;
}
// softplus(x) = max(x, 0) + log(1 + exp(-|x|)), exp by exp2v: no library call (Sleef's exp and log1p took half of
// the ordered scan's forward); x itself above 20, as torch's softplus (and for x = inf)
static inline Vec softplus(const Vec& x) {
    const Vec e = exp2v(x.abs().neg() * Vec(LOG2E));
    return Vec::blendv(at::vec::maximum(x, Vec(0.f)) + log1p_unit(e), x, x > Vec(20.f));
}
static inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + exp2v(x.neg() * Vec(LOG2E))); }
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
// Δ's row before its bias at channels [e0, e0 + nc): drow[e0..] when R == 0 (Δ given), or its low-rank form
// sum_j W[j][e] drow[j] with W (R, E) one direction's dt_proj, transposed (Δ computed here, never stored)
static inline Vec delta_row(const float* drow, const float* W, int64_t R, int64_t E, int64_t e0, int64_t nc) {
    if (R == 0) return Vec::loadu(drow + e0, nc);
    Vec acc(0.f);
    for (int64_t j = 0; j < R; j++) acc = at::vec::fmadd(Vec::loadu(W + j * E + e0, nc), Vec(drow[j]), acc);
    return acc;
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
                // chunk start [b][d][k][n], channel-fastest: at ((b * n_chunks + k) * N + n) * D + d
                for (int64_t n = 0; n < N; n++)
                    x[n].store(starts + ((b * n_chunks + k) * N + n) * dim + d0, nc);
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
                    Vec::loadu(starts + ((b * n_chunks + k) * N + n) * dim + d0, nc).store(xs + n * VL);
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

# -----------------------------------------------------------------------------
# The mixer's kernels with the scan orders in their loads and stores (issue "the mixer in one pass";
# scan_kernel.py's `ordered_scan` and `ordered_conv` are their Python side). Tensors are channels-last:
# a token (a "row") is E contiguous channels, so a step loads and stores whole vectors. order (K, Lmax)
# int64: the row-major token at step s of direction k, -1 for a padding step (a zero token).

ORDERED_SCAN_FWD = COMMON + r'''
// The selective scan of K directions. Inputs u, Δ, B, C at row order[k][s] (IDX_IN) or row s (inputs already in
// scan order); z read, and out written, at row order[k][s], real tokens only. Strides st[]: (batch, direction,
// row) of u, Δ, B/C, z, out, channel stride 1 (u and z may be shared by the directions: stride 0). R > 0: delta
// holds Δ's low-rank input (rows of R) and Wdt (K, R, E) the dt_proj weights: Δ = Wdt[k] delta_row (delta_row).
extern "C" void kernel(const float* u, const float* delta, const float* A2t, const float* Bm, const float* Cm,
                       const float* Dskip, const float* z, const float* bias, const float* Wdt, const int64_t* order,
                       const int64_t* st, float* out, float* starts, int64_t batch, int64_t K, int64_t E, int64_t Lmax,
                       int64_t S, int64_t R, int64_t flags) {
    const bool has_D = flags & 1, has_z = flags & 2, has_bias = flags & 4, sp = flags & 8, idx_in = flags & 16,
               save = flags & 32;
    const int64_t n_chunks = (Lmax + T - 1) / T, nvec = (E + VL - 1) / VL, per = (nvec + S - 1) / S;
    static const float zeros[N] = {0.f};
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < batch * K * S; w++) {
        const int64_t b = w / (K * S), k = (w / S) %% K, sp_ = w %% S;
        const int64_t* ord = order + k * Lmax;
        const float* u0 = u + b * st[0] + k * st[1]; const float* d0p = delta + b * st[3] + k * st[4];
        const float* B0 = Bm + b * st[6] + k * st[7]; const float* C0 = Cm + b * st[6] + k * st[7];
        const float* z0 = z + b * st[9] + k * st[10]; float* o0 = out + b * st[12] + k * st[13];
        const float* Wk = Wdt + k * R * E;
        for (int64_t v = sp_ * per; v < std::min(nvec, (sp_ + 1) * per); v++) {
            const int64_t e0 = v * VL, nc = std::min(VL, E - e0), d0 = k * E + e0;
            Vec a[N], x[N];
            for (int64_t n = 0; n < N; n++) { a[n] = gather(A2t + n * K * E + d0, 1, nc); x[n] = Vec(0.f); }
            const Vec vbias = has_bias ? gather(bias + d0, 1, nc) : Vec(0.f);
            const Vec vD = has_D ? gather(Dskip + d0, 1, nc) : Vec(0.f);
            alignas(64) float dtb[T * VL], dub[T * VL], yb[T * VL];
            const float* Bs[T]; const float* Cs[T];
            for (int64_t c = 0; c < n_chunks; c++) {
                const int64_t t0 = c * T, nt = std::min(T, Lmax - t0);
                // chunk start [b][d][c][n], channel-fastest: at ((b * n_chunks + c) * N + n) * K*E + d
                if (save)
                    for (int64_t n = 0; n < N; n++)
                        x[n].store(starts + ((b * n_chunks + c) * N + n) * K * E + d0, nc);
                // the chunk's Δ, Δu and D u first, apart from the recurrence: no step waits on its softplus
                for (int64_t t = 0; t < nt; t++) {
                    const int64_t r = idx_in ? ord[t0 + t] : t0 + t;
                    Vec dt = vbias, uu(0.f);
                    Bs[t] = zeros; Cs[t] = zeros;
                    if (r >= 0) {                                             // else a zero token
                        dt = dt + delta_row(d0p + r * st[5], Wk, R, E, e0, nc);
                        uu = Vec::loadu(u0 + r * st[2] + e0, nc);
                        Bs[t] = B0 + r * st[8]; Cs[t] = C0 + r * st[8];
                    }
                    if (sp) dt = softplus(dt);                                // Δ
                    dt.store(dtb + t * VL); (dt * uu).store(dub + t * VL); (vD * uu).store(yb + t * VL);
                }
                for (int64_t t = 0; t < nt; t++) {                            // the recurrence
                    const Vec dt = Vec::loadu(dtb + t * VL), dtu = Vec::loadu(dub + t * VL);
                    const float* Bn = Bs[t]; const float* Cn = Cs[t];
                    Vec y[4] = {Vec::loadu(yb + t * VL), Vec(0.f), Vec(0.f), Vec(0.f)};
                    _Pragma("GCC unroll 16") for (int64_t n = 0; n < N; n++) {
                        x[n] = at::vec::fmadd(exp2v(a[n] * dt), x[n], dtu * Vec(Bn[n]));   // exp(ΔA) x + ΔBu
                        y[n %% 4] = at::vec::fmadd(x[n], Vec(Cn[n]), y[n %% 4]);           // y = sum_n x C + D u
                    }
                    ((y[0] + y[1]) + (y[2] + y[3])).store(yb + t * VL);
                }
                for (int64_t t = 0; t < nt; t++) {                            // the gate, at the tokens' rows
                    const int64_t ro = ord[t0 + t];
                    if (ro < 0) continue;                                     // a padding step: no output
                    Vec yy = Vec::loadu(yb + t * VL);
                    if (has_z) { const Vec zz = Vec::loadu(z0 + ro * st[11] + e0, nc); yy = yy * zz * sigmoid(zz); }
                    yy.store(o0 + ro * st[14] + e0, nc);
                }
            }
        }
    }
}
'''

ORDERED_SCAN_BWD = COMMON + r'''
// The backward of ORDERED_SCAN_FWD, chunk by chunk in reverse (as BWD), but with the chunk loop outside the
// channel-vector loop: a work item runs one chunk for each of its vectors (each carrying its own dh), so its
// dB, dC sums stay a (T, N) block of vectors in L1 and are written out after each chunk (on a 56×56 LocalVMamba
// stage a whole-sequence buffer would not fit in any cache). Outputs per direction, in the inputs' rows:
// du (rows of E at batch and direction strides st[16], st[17]), dΔ (batch, K, rows, E); dz (batch, K, L_out, E),
// summed over K by the caller when z is shared; dB, dC (batch, K, S, rows, N) per channel split; dA (batch, K*E,
// N), dD and dbias (batch, K*E) per batch row. dbias sums dΔ over every step, padding steps included (their Δ
// is softplus(bias)). dΔ is Δ's full gradient also where Δ came in low-rank (R > 0): the caller projects it
// onto the low-rank input and dt_proj.
extern "C" void kernel(const float* u, const float* delta, const float* A2t, const float* Bm, const float* Cm,
                       const float* Dskip, const float* z, const float* bias, const float* Wdt, const int64_t* order,
                       const int64_t* st, const float* starts, const float* dout, float* du, float* ddelta, float* dz,
                       float* dBs, float* dCs, float* dAb, float* dDb, float* dbb, int64_t batch, int64_t K,
                       int64_t E, int64_t Lmax, int64_t rows, int64_t S, int64_t R, int64_t flags) {
    const bool has_D = flags & 1, has_z = flags & 2, has_bias = flags & 4, sp = flags & 8, idx_in = flags & 16;
    const int64_t n_chunks = (Lmax + T - 1) / T, nvec = (E + VL - 1) / VL, per = (nvec + S - 1) / S;
    const int64_t Lout = st[15];
    static const float zeros[N] = {0.f};
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < batch * K * S; w++) {
        const int64_t b = w / (K * S), k = (w / S) %% K, sp_ = w %% S;
        const int64_t v0 = std::min(nvec, sp_ * per), nv = std::min(nvec, v0 + per) - v0;
        float* dBw = dBs + ((b * K + k) * S + sp_) * rows * N; float* dCw = dCs + ((b * K + k) * S + sp_) * rows * N;
        if (nv <= 0) { std::fill(dBw, dBw + rows * N, 0.f); std::fill(dCw, dCw + rows * N, 0.f); continue; }
        const int64_t* ord = order + k * Lmax;
        const float* u0 = u + b * st[0] + k * st[1]; const float* d0p = delta + b * st[3] + k * st[4];
        const float* B0 = Bm + b * st[6] + k * st[7]; const float* C0 = Cm + b * st[6] + k * st[7];
        const float* z0 = z + b * st[9] + k * st[10]; const float* g0 = dout + b * st[12] + k * st[13];
        const float* Wk = Wdt + k * R * E;
        float* du0 = du + b * st[16] + k * st[17]; float* dd0 = ddelta + (b * K + k) * rows * E;
        float* dz0 = dz + (b * K + k) * Lout * E;
        // per vector of the item: A log2(e), bias, D, and the carried dh and sums
        std::vector<Vec> av(nv * N), dhv(nv * N, Vec(0.f)), dAv(nv * N, Vec(0.f)), biasv(nv), Dv(nv);
        std::vector<Vec> dDv(nv, Vec(0.f)), dbv(nv, Vec(0.f));
        for (int64_t i = 0; i < nv; i++) {
            const int64_t e0 = (v0 + i) * VL, nc = std::min(VL, E - e0), d0 = k * E + e0;
            for (int64_t n = 0; n < N; n++) av[i * N + n] = gather(A2t + n * K * E + d0, 1, nc);
            biasv[i] = has_bias ? gather(bias + d0, 1, nc) : Vec(0.f);
            Dv[i] = has_D ? gather(Dskip + d0, 1, nc) : Vec(0.f);
        }
        alignas(64) float dsp[T * VL], dts[T * VL], us[T * VL], gys[T * VL], dzf[T * VL];
        alignas(64) float xs[(T + 1) * N * VL], eA[T * N * VL];              // x0 and the chunk's states, exp(ΔA)
        std::vector<Vec> sumB(T * N), sumC(T * N);                            // the chunk's dB, dC, lane-wise
        for (int64_t c = n_chunks - 1; c >= 0; c--) {
            const int64_t t0 = c * T, nt = std::min(T, Lmax - t0);
            std::fill(sumB.begin(), sumB.end(), Vec(0.f)); std::fill(sumC.begin(), sumC.end(), Vec(0.f));
            for (int64_t i = 0; i < nv; i++) {
                const int64_t e0 = (v0 + i) * VL, nc = std::min(VL, E - e0), d0 = k * E + e0;
                Vec a[N], dh[N], dA_sum[N];                   // local copies: no store to the sums can alias them
                std::copy_n(av.data() + i * N, N, a); std::copy_n(dhv.data() + i * N, N, dh);
                std::copy_n(dAv.data() + i * N, N, dA_sum);
                const Vec vbias = biasv[i], vD = Dv[i];
                Vec dD_sum = dDv[i], db_sum = dbv[i];
                for (int64_t n = 0; n < N; n++)
                    Vec::loadu(starts + ((b * n_chunks + c) * N + n) * K * E + d0, nc).store(xs + n * VL);
                for (int64_t t = 0; t < nt; t++) {                       // the chunk's Δ first (see the forward)
                    const int64_t r = idx_in ? ord[t0 + t] : t0 + t;
                    Vec raw = vbias, uu(0.f);
                    if (r >= 0) {
                        raw = raw + delta_row(d0p + r * st[5], Wk, R, E, e0, nc);
                        uu = Vec::loadu(u0 + r * st[2] + e0, nc);
                    }
                    (sp ? softplus(raw) : raw).store(dts + t * VL); uu.store(us + t * VL);
                    (sp ? Vec::blendv(sigmoid(raw), Vec(1.f), raw > Vec(20.f)) : Vec(1.f)).store(dsp + t * VL);  // Δ'
                }
                for (int64_t t = 0; t < nt; t++) {                       // the gate's factors first, too
                    const int64_t ro = ord[t0 + t];
                    const Vec go = ro >= 0 ? Vec::loadu(g0 + ro * st[14] + e0, nc) : Vec(0.f);
                    const Vec zz = has_z && ro >= 0 ? Vec::loadu(z0 + ro * st[11] + e0, nc) : Vec(0.f);
                    const Vec sz = has_z ? sigmoid(zz) : Vec(1.f);
                    (has_z ? go * zz * sz : go).store(gys + t * VL);      // dL/dy
                    if (has_z) (go * sz * (Vec(1.f) + zz * (Vec(1.f) - sz))).store(dzf + t * VL);   // dL/dz over y
                }
                for (int64_t t = 0; t < nt; t++) {                       // the chunk forward again
                    const int64_t r = idx_in ? ord[t0 + t] : t0 + t;
                    const float* Bn = r >= 0 ? B0 + r * st[8] : zeros;
                    const Vec dt = Vec::loadu(dts + t * VL), dtu = dt * Vec::loadu(us + t * VL);
                    _Pragma("GCC unroll 16") for (int64_t n = 0; n < N; n++) {
                        const Vec e = exp2v(a[n] * dt);
                        e.store(eA + (t * N + n) * VL);
                        const Vec x = at::vec::fmadd(e, Vec::loadu(xs + (t * N + n) * VL), dtu * Vec(Bn[n]));
                        x.store(xs + ((t + 1) * N + n) * VL);
                    }
                }
                // the reverse scan, over the states in two halves [0, N/2), [N/2, N): each half's dh and dA
                // sums stay in registers across the chunk (all N of them would not fit: 2 N vectors); the first
                // half leaves its per-step sums over n (wA, hB, y) in part[] for the second to finish
                alignas(64) float part[T * 3 * VL];
                const auto reverse = [&](auto n0c, auto n1c) {
                    constexpr int64_t n0 = decltype(n0c)::value, n1 = decltype(n1c)::value, last = n1 == N;
                    Vec hd[n1 - n0 + 1], hA[n1 - n0 + 1];   // this half's dh and dA sums (+1: N = 1 has an empty half)
                    for (int64_t j = 0; j < n1 - n0; j++) { hd[j] = dh[n0 + j]; hA[j] = dA_sum[n0 + j]; }
                    for (int64_t t = nt - 1; t >= 0; t--) {
                        const int64_t s = t0 + t, ro = ord[s], r = idx_in ? ro : s;
                        const Vec dt = Vec::loadu(dts + t * VL), uu = Vec::loadu(us + t * VL), dtu = dt * uu;
                        const Vec gy = Vec::loadu(gys + t * VL);
                        const float* Bn = r >= 0 ? B0 + r * st[8] : zeros;
                        const float* Cn = r >= 0 ? C0 + r * st[8] : zeros;
                        Vec* sB = sumB.data() + t * N; Vec* sC = sumC.data() + t * N;
                        float* pt = part + t * 3 * VL;
                        Vec wA = n0 ? Vec::loadu(pt) : Vec(0.f), hB = n0 ? Vec::loadu(pt + VL) : Vec(0.f);
                        Vec y = n0 ? Vec::loadu(pt + 2 * VL) : vD * uu;
                        _Pragma("GCC unroll 16")
                        for (int64_t j = 0; j < n1 - n0; j++) {
                            const int64_t n = n0 + j;
                            const Vec xt = Vec::loadu(xs + ((t + 1) * N + n) * VL);
                            const Vec xp = Vec::loadu(xs + (t * N + n) * VL);
                            const Vec e = Vec::loadu(eA + (t * N + n) * VL), vB(Bn[n]), vC(Cn[n]);
                            hd[j] = at::vec::fmadd(gy, vC, hd[j]);           // dh_t = g_t C_t + carry
                            const Vec wn = hd[j] * e * xp;                    // dh · exp(Δ_t A) x_{t-1}
                            wA = at::vec::fmadd(wn, a[n], wA);
                            hA[j] = at::vec::fmadd(wn, dt, hA[j]);
                            hB = at::vec::fmadd(hd[j], vB, hB);               // sum_n dh B
                            if (has_z) y = at::vec::fmadd(xt, vC, y);        // y_t, for dz
                            sB[n] = at::vec::fmadd(hd[j], dtu, sB[n]);
                            sC[n] = at::vec::fmadd(xt, gy, sC[n]);
                            hd[j] = hd[j] * e;                                // the carry into step t - 1
                        }
                        if (!last) {                                          // the first half: its sums for the second
                            wA.store(pt); hB.store(pt + VL); y.store(pt + 2 * VL);
                            continue;
                        }
                        Vec ddt = wA * Vec(LN2) + uu * hB;                    // dL/dΔ
                        dD_sum = at::vec::fmadd(gy, uu, dD_sum);
                        if (sp) ddt = ddt * Vec::loadu(dsp + t * VL);
                        db_sum = db_sum + ddt;
                        if (r >= 0) {
                            (dt * hB + gy * vD).store(du0 + r * E + e0, nc); // du
                            ddt.store(dd0 + r * E + e0, nc);
                        }
                        if (has_z && ro >= 0)                                 // dz
                            (Vec::loadu(dzf + t * VL) * y).store(dz0 + ro * E + e0, nc);
                    }
                    for (int64_t j = 0; j < n1 - n0; j++) { dh[n0 + j] = hd[j]; dA_sum[n0 + j] = hA[j]; }
                };
                reverse(std::integral_constant<int64_t, 0>(), std::integral_constant<int64_t, N / 2>());
                reverse(std::integral_constant<int64_t, N / 2>(), std::integral_constant<int64_t, N>());
                dDv[i] = dD_sum; dbv[i] = db_sum;
                std::copy_n(dh, N, dhv.data() + i * N); std::copy_n(dA_sum, N, dAv.data() + i * N);
            }
            for (int64_t t = 0; t < nt; t++) {                           // the chunk's dB, dC: lanes summed once
                const int64_t r = idx_in ? ord[t0 + t] : t0 + t;
                if (r < 0) continue;
                for (int64_t n = 0; n < N; n++) {
                    dBw[r * N + n] = hsum(sumB[t * N + n]); dCw[r * N + n] = hsum(sumC[t * N + n]);
                }
            }
        }
        for (int64_t i = 0; i < nv; i++) {
            const int64_t e0 = (v0 + i) * VL, nc = std::min(VL, E - e0), d0 = k * E + e0;
            for (int64_t n = 0; n < N; n++) scatter(dAv[i * N + n], dAb + (b * K * E + d0) * N + n, N, nc);
            scatter(dDv[i], dDb + b * K * E + d0, 1, nc);
            scatter(dbv[i], dbb + b * K * E + d0, 1, nc);
        }
    }
}
'''

CONV_COMMON = r'''
// the pre-activation of channels [e0, e0 + nc) at step s: bias + sum_j w[j] x[order[s - (dc-1) + j]] (zero outside)
static inline Vec conv_pre(const float* x, int64_t sx_r, const float* wt, const float* bias, const int64_t* ord,
                           int64_t s, int64_t e0, int64_t nc, int64_t E, int64_t dc) {
    Vec acc = Vec::loadu(bias + e0, nc);
    for (int64_t j = 0; j < dc; j++) {
        const int64_t sj = s - (dc - 1) + j, r = sj >= 0 ? ord[sj] : -1;
        if (r >= 0) acc = at::vec::fmadd(Vec::loadu(wt + j * E + e0, nc), Vec::loadu(x + r * sx_r + e0, nc), acc);
    }
    return acc;
}
'''

ORDERED_CONV_FWD = COMMON + CONV_COMMON + r'''
// LocalVim's causal depthwise conv1d of each direction, read through its order: u[k][b][s] = SiLU(bias_k +
// sum_j w_k[j] x[order_k[s - (dc-1) + j]]), x (batch, L_in, E) at strides (sx_b, sx_r), zero outside the
// sequence and at padding steps; wt (K, dc, E), bias (K, E); u (K, batch, Lmax, E).
extern "C" void kernel(const float* x, const float* wt, const float* bias, const int64_t* order, float* u,
                       int64_t batch, int64_t K, int64_t E, int64_t Lmax, int64_t dc, int64_t sx_b, int64_t sx_r) {
    const int64_t nblk = (Lmax + T - 1) / T;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < K * batch * nblk; w++) {
        const int64_t k = w / (batch * nblk), b = (w / nblk) %% batch, s0 = (w %% nblk) * T;
        const int64_t* ord = order + k * Lmax;
        for (int64_t s = s0; s < std::min(Lmax, s0 + T); s++) {
            float* dst = u + ((k * batch + b) * Lmax + s) * E;
            for (int64_t e0 = 0; e0 < E; e0 += VL) {
                const int64_t nc = std::min(VL, E - e0);
                const Vec acc = conv_pre(x + b * sx_b, sx_r, wt + k * dc * E, bias + k * E, ord, s, e0, nc, E, dc);
                (acc * sigmoid(acc)).store(dst + e0, nc);                     // SiLU
            }
        }
    }
}
'''

ORDERED_CONV_BWD = COMMON + CONV_COMMON + r'''
// The backward of ORDERED_CONV_FWD. Pass 1, per (direction, batch row): the pre-activation again, dpre =
// du SiLU'(pre) (K, batch, Lmax, E), and that row's dw (batch, K, dc, E) and dbias (batch, K, E). Pass 2, per
// token: dx[b][p] = sum_k sum_j w_k[j] dpre[k][b][inv_k[p] + dc-1 - j] (batch, L_in, E): every token's
// gradient summed in one place, in one order, with no atomics.
extern "C" void kernel(const float* x, const float* wt, const float* bias, const int64_t* order, const int64_t* inv,
                       const float* du, float* dpre, float* dx, float* dwb, float* dbb, int64_t batch, int64_t K,
                       int64_t E, int64_t Lmax, int64_t Lin, int64_t dc, int64_t sx_b, int64_t sx_r) {
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < K * batch; w++) {
        const int64_t k = w / batch, b = w %% batch;
        const int64_t* ord = order + k * Lmax;
        float* dw = dwb + (b * K + k) * dc * E; float* db = dbb + (b * K + k) * E;
        for (int64_t i = 0; i < dc * E; i++) dw[i] = 0.f;
        for (int64_t i = 0; i < E; i++) db[i] = 0.f;
        for (int64_t s = 0; s < Lmax; s++) {
            const int64_t off = ((k * batch + b) * Lmax + s) * E;
            for (int64_t e0 = 0; e0 < E; e0 += VL) {
                const int64_t nc = std::min(VL, E - e0);
                const Vec acc = conv_pre(x + b * sx_b, sx_r, wt + k * dc * E, bias + k * E, ord, s, e0, nc, E, dc);
                const Vec sg = sigmoid(acc);
                const Vec g = Vec::loadu(du + off + e0, nc) * sg * (Vec(1.f) + acc * (Vec(1.f) - sg));   // SiLU
                g.store(dpre + off + e0, nc);
                (Vec::loadu(db + e0, nc) + g).store(db + e0, nc);
                for (int64_t j = 0; j < dc; j++) {
                    const int64_t sj = s - (dc - 1) + j, r = sj >= 0 ? ord[sj] : -1;
                    if (r >= 0) at::vec::fmadd(g, Vec::loadu(x + b * sx_b + r * sx_r + e0, nc),
                                               Vec::loadu(dw + j * E + e0, nc)).store(dw + j * E + e0, nc);
                }
            }
        }
    }
    #pragma omp parallel for schedule(dynamic)
    for (int64_t w = 0; w < batch * Lin; w++) {
        const int64_t b = w / Lin, p = w %% Lin;
        for (int64_t e0 = 0; e0 < E; e0 += VL) {
            const int64_t nc = std::min(VL, E - e0);
            Vec acc(0.f);
            for (int64_t k = 0; k < K; k++) {
                const int64_t s0 = inv[k * Lin + p];
                for (int64_t j = 0; j < dc; j++) {
                    const int64_t s = s0 + (dc - 1) - j;
                    if (s >= Lmax) continue;
                    const Vec g = Vec::loadu(dpre + ((k * batch + b) * Lmax + s) * E + e0, nc);
                    acc = at::vec::fmadd(Vec::loadu(wt + (k * dc + j) * E + e0, nc), g, acc);
                }
            }
            acc.store(dx + (b * Lin + p) * E + e0, nc);
        }
    }
}
'''


GATED_SUM = COMMON + r"""
// SCAttn's channel gate and the sum of the K directions in one pass (the fused mixer's, after the scan):
// out[b][t] = sum_k a[b][k] * y[b][k][t], vectors of E channels; y (batch, K, L, E), a (batch, K, E), out
// (batch, L, E). Each output is one thread's, its K terms added in order (the thread count changes no bit).
extern "C" void kernel(const float* y, const float* a, float* out, int64_t batch, int64_t K, int64_t L, int64_t E) {
    #pragma omp parallel for schedule(static)
    for (int64_t w = 0; w < batch * L; w++) {
        const int64_t b = w / L, t = w %% L;
        for (int64_t e0 = 0; e0 < E; e0 += VL) {
            const int64_t nc = std::min(VL, E - e0);
            Vec acc(0.f);
            for (int64_t k = 0; k < K; k++)
                acc = at::vec::fmadd(Vec::loadu(a + (b * K + k) * E + e0, nc),
                                     Vec::loadu(y + ((b * K + k) * L + t) * E + e0, nc), acc);
            acc.store(out + w * E + e0, nc);
        }
    }
}
"""

TOKEN_NORM_MEAN = COMMON + r"""
// SCAttn's statistics in one read of y (batch, K, L, E): each token's mean mu and r = 1/sqrt(var + eps) over its E
// channels (two passes over the row, in L1), and the sum of the normalised tokens (y_t - mu_t) r_t over the
// tokens of part p (P parts of ceil(L / P) tokens; parts (batch, K, P, E), summed afterwards in order).
extern "C" void kernel(const float* y, float* parts, float* mu, float* rstd, int64_t batch, int64_t K, int64_t L,
                       int64_t E, int64_t P, float eps) {
    const int64_t per = (L + P - 1) / P;
    #pragma omp parallel for schedule(static)
    for (int64_t w = 0; w < batch * K * P; w++) {
        const int64_t bk = w / P, p = w %% P;
        float* acc = parts + w * E;
        for (int64_t e = 0; e < E; e++) acc[e] = 0.f;
        for (int64_t t = p * per; t < std::min(L, (p + 1) * per); t++) {
            const float* row = y + (bk * L + t) * E;
            Vec s(0.f), q(0.f);
            for (int64_t e0 = 0; e0 < E; e0 += VL) s = s + Vec::loadu(row + e0, std::min(VL, E - e0));
            const float m = hsum(s) / E;
            for (int64_t e0 = 0; e0 < E; e0 += VL) {                        // lanes past E count nothing
                const int64_t nc = std::min(VL, E - e0);
                const Vec d = Vec::loadu(row + e0, nc) - Vec(m);
                q = q + Vec::set(Vec(0.f), d * d, nc);
            }
            const float r = 1.f / std::sqrt(hsum(q) / E + eps);
            mu[bk * L + t] = m; rstd[bk * L + t] = r;
            for (int64_t e0 = 0; e0 < E; e0 += VL) {
                const int64_t nc = std::min(VL, E - e0);
                at::vec::fmadd(Vec::loadu(row + e0, nc) - Vec(m), Vec(r), Vec::loadu(acc + e0, nc)).store(acc + e0, nc);
            }
        }
    }
}
"""

TOKEN_NORM_MEAN_BWD = COMMON + r"""
// The backward of TOKEN_NORM_MEAN in one pass: LayerNorm's backward with the same gradient g (batch, K, E) (the
// mean's gradient over L) at every token: dy_t = r_t (g - mean_e g - x̂_t mean_e(g x̂_t)), x̂_t = (y_t - mu_t) r_t.
// has_gate: plus GATED_SUM's gradient a[b][k] gs[b][t] (a (batch, K, E), gs (batch, L, E)), so that y's two
// gradients are added as dy is written (SCAttn and the sum: scan_kernel._SCAttnSum), not in a pass of their own.
extern "C" void kernel(const float* y, const float* mu, const float* rstd, const float* g, const float* a,
                       const float* gs, float* dy, int64_t batch, int64_t K, int64_t L, int64_t E, int64_t P,
                       int64_t has_gate) {
    const int64_t per = (L + P - 1) / P;
    #pragma omp parallel for schedule(static)
    for (int64_t w = 0; w < batch * K * P; w++) {
        const int64_t bk = w / P, p = w %% P;
        const float* gk = g + bk * E; const float* ak = a + bk * E; const float* gsb = gs + bk / K * L * E;
        Vec gsum(0.f);
        for (int64_t e0 = 0; e0 < E; e0 += VL) gsum = gsum + Vec::loadu(gk + e0, std::min(VL, E - e0));
        const Vec gm(hsum(gsum) / E);
        for (int64_t t = p * per; t < std::min(L, (p + 1) * per); t++) {
            const float* row = y + (bk * L + t) * E;
            const Vec m(mu[bk * L + t]), r(rstd[bk * L + t]);
            Vec c(0.f);
            for (int64_t e0 = 0; e0 < E; e0 += VL) {                        // lanes past E: g loads 0, adds 0
                const int64_t nc = std::min(VL, E - e0);
                c = at::vec::fmadd(Vec::loadu(gk + e0, nc), (Vec::loadu(row + e0, nc) - m) * r, c);
            }
            const Vec cm(hsum(c) / E);
            for (int64_t e0 = 0; e0 < E; e0 += VL) {
                const int64_t nc = std::min(VL, E - e0);
                const Vec xh = (Vec::loadu(row + e0, nc) - m) * r;
                Vec d = r * (Vec::loadu(gk + e0, nc) - gm - xh * cm);
                if (has_gate) d = at::vec::fmadd(Vec::loadu(ak + e0, nc), Vec::loadu(gsb + t * E + e0, nc), d);
                d.store(dy + (bk * L + t) * E + e0, nc);
            }
        }
    }
}
"""

GATED_SUM_BWD = COMMON + r"""
// The backward of GATED_SUM in one pass over the tokens: dy[b][k][t] = a[b][k] g[b][t] (need_dy; without it dy is
// not written: TOKEN_NORM_MEAN_BWD adds that term), and the tokens of part p summed into da's parts (batch, P, K,
// E): sum_t y[b][k][t] g[b][t] (the parts summed afterwards in order).
extern "C" void kernel(const float* y, const float* a, const float* g, float* dy, float* parts, int64_t batch,
                       int64_t K, int64_t L, int64_t E, int64_t P, int64_t need_dy) {
    const int64_t per = (L + P - 1) / P;
    #pragma omp parallel for schedule(static)
    for (int64_t w = 0; w < batch * P; w++) {
        const int64_t b = w / P, p = w %% P;
        float* acc = parts + w * K * E;
        for (int64_t i = 0; i < K * E; i++) acc[i] = 0.f;
        for (int64_t t = p * per; t < std::min(L, (p + 1) * per); t++)
            for (int64_t k = 0; k < K; k++) {
                const int64_t row = ((b * K + k) * L + t) * E;
                for (int64_t e0 = 0; e0 < E; e0 += VL) {
                    const int64_t nc = std::min(VL, E - e0);
                    const Vec gv = Vec::loadu(g + (b * L + t) * E + e0, nc);
                    if (need_dy) (Vec::loadu(a + (b * K + k) * E + e0, nc) * gv).store(dy + row + e0, nc);
                    at::vec::fmadd(Vec::loadu(y + row + e0, nc), gv, Vec::loadu(acc + k * E + e0, nc))
                        .store(acc + k * E + e0, nc);
                }
            }
    }
}
"""

ROPE_COMMON = r"""
// RoPE's two helpers (ROPE_RMS_NORM and its backward): the channel pairs swapped, and sin with a sign per lane
static inline Vec swap_pairs(const Vec& v) {            // (v0, v1, v2, v3, ...) -> (v1, v0, v3, v2, ...)
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_permute_ps(v, 0xB1));
#elif defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_permute_ps(v, 0xB1));
#else
    alignas(64) float a[VL], b[VL];
    v.store(a);
    for (int64_t i = 0; i < VL; i++) b[i] = a[i ^ 1];
    return Vec::loadu(b);
#endif
}
static inline Vec signed_sin(const float* sin, int64_t nc) {   // sin with its even lanes negated
    alignas(64) float sg[VL];
    for (int64_t i = 0; i < VL; i++) sg[i] = i %% 2 ? 1.f : -1.f;
    return Vec::loadu(sin, nc) * Vec::loadu(sg);
}
"""

ROPE_RMS_NORM = COMMON + ROPE_COMMON + r"""
// LocalVim's block before its mixer, per token in one pass: s = residual + hidden (hidden alone in the first block,
// has_res off), rotated by RoPE where has_rope (the pairs (s0, s1) of channels (2i, 2i+1) -> (s0 cos - s1 sin,
// s1 cos + s0 sin), cos and sin (L, D): s cos + swap(s) sin±, sin± = sin with even channels negated), written to
// res (rows, D); out = res r w with r = 1/sqrt(mean_d res^2 + eps) (RMSNorm), r to rstd (rows). Rows of D channels,
// token l = row %% L; each row is one thread's (the thread count changes no bit).
extern "C" void kernel(const float* residual, const float* hidden, const float* cos, const float* sin, const float* w,
                       float* res, float* out, float* rstd, int64_t rows, int64_t L, int64_t D, int64_t flags,
                       float eps) {
    const bool has_res = flags & 1, has_rope = flags & 2;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t l = i %% L;
        Vec q(0.f);
        for (int64_t d0 = 0; d0 < D; d0 += VL) {
            const int64_t nc = std::min(VL, D - d0);
            Vec x = Vec::loadu(hidden + i * D + d0, nc);
            if (has_res) x = Vec::loadu(residual + i * D + d0, nc) + x;
            if (has_rope)                                                   // pairs never straddle a vector: D, VL even
                x = x * Vec::loadu(cos + l * D + d0, nc) + swap_pairs(x) * signed_sin(sin + l * D + d0, nc);
            x.store(res + i * D + d0, nc);
            q = at::vec::fmadd(x, x, q);                                    // lanes past D load 0: add 0
        }
        const float r = 1.f / std::sqrt(hsum(q) / D + eps);
        rstd[i] = r;
        for (int64_t d0 = 0; d0 < D; d0 += VL) {
            const int64_t nc = std::min(VL, D - d0);
            (Vec::loadu(res + i * D + d0, nc) * Vec(r) * Vec::loadu(w + d0, nc)).store(out + i * D + d0, nc);
        }
    }
}
"""

ROPE_RMS_NORM_BWD = COMMON + ROPE_COMMON + r"""
// The backward of ROPE_RMS_NORM, per token: RMSNorm's, g = dout w, dres += r g - res r^3 mean_d(g res) (dres: the
// gradient of res from its other reader, the next block, or 0 where has_dres is off), then RoPE's transpose:
// ds = dres cos + swap(dres sin±) (the same cos and sin±), to ds (rows, D): the gradient of residual and of hidden.
// dw's partial sums over the rows of part p (parts (P, D), summed afterwards in order).
extern "C" void kernel(const float* res, const float* rstd, const float* cos, const float* sin, const float* w,
                       const float* dout, const float* dres, float* ds, float* parts, int64_t rows, int64_t L,
                       int64_t D, int64_t flags, int64_t P) {
    const bool has_dres = flags & 1, has_rope = flags & 2;
    const int64_t per = (rows + P - 1) / P;
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < P; p++) {
        float* dw = parts + p * D;
        for (int64_t d = 0; d < D; d++) dw[d] = 0.f;
        for (int64_t i = p * per; i < std::min(rows, (p + 1) * per); i++) {
            const int64_t l = i %% L;
            const Vec r(rstd[i]);
            Vec c(0.f);
            for (int64_t d0 = 0; d0 < D; d0 += VL) {
                const int64_t nc = std::min(VL, D - d0);
                const Vec x = Vec::loadu(res + i * D + d0, nc), dn = Vec::loadu(dout + i * D + d0, nc);
                c = at::vec::fmadd(dn * Vec::loadu(w + d0, nc), x, c);
                at::vec::fmadd(dn, x * r, Vec::loadu(dw + d0, nc)).store(dw + d0, nc);
            }
            const Vec cm(hsum(c) / D);
            for (int64_t d0 = 0; d0 < D; d0 += VL) {
                const int64_t nc = std::min(VL, D - d0);
                const Vec x = Vec::loadu(res + i * D + d0, nc);
                Vec g = r * (Vec::loadu(dout + i * D + d0, nc) * Vec::loadu(w + d0, nc) - x * r * r * cm);
                if (has_dres) g = g + Vec::loadu(dres + i * D + d0, nc);
                if (has_rope)
                    g = g * Vec::loadu(cos + l * D + d0, nc) + swap_pairs(g * signed_sin(sin + l * D + d0, nc));
                g.store(ds + i * D + d0, nc);
            }
        }
    }
}
"""

SIGNATURES = {   # the pybinding's argument types: inputs, outputs, then the six int64 sizes and flags
    "fwd": ["const float*"] * 8 + ["float*"] * 3 + ["int64_t"] * 6,
    "bwd": ["const float*"] * 10 + ["float*"] * 7 + ["int64_t"] * 6,
    "ordered_scan_fwd": ["const float*"] * 9 + ["const int64_t*"] * 2 + ["float*"] * 2 + ["int64_t"] * 7,
    "ordered_scan_bwd": ["const float*"] * 9 + ["const int64_t*"] * 2 + ["const float*"] * 2 + ["float*"] * 8
                        + ["int64_t"] * 8,
    "ordered_conv_fwd": ["const float*"] * 3 + ["const int64_t*", "float*"] + ["int64_t"] * 7,
    "ordered_conv_bwd": ["const float*"] * 3 + ["const int64_t*"] * 2 + ["const float*"] + ["float*"] * 4
                        + ["int64_t"] * 8,
    "gated_sum": ["const float*"] * 2 + ["float*"] + ["int64_t"] * 4,
    "token_norm_mean": ["const float*"] + ["float*"] * 3 + ["int64_t"] * 5 + ["float"],
    "token_norm_mean_bwd": ["const float*"] * 6 + ["float*"] + ["int64_t"] * 6,
    "gated_sum_bwd": ["const float*"] * 3 + ["float*"] * 2 + ["int64_t"] * 6,
    "rope_rms_norm": ["const float*"] * 5 + ["float*"] * 3 + ["int64_t"] * 4 + ["float"],
    "rope_rms_norm_bwd": ["const float*"] * 7 + ["float*"] * 2 + ["int64_t"] * 5,
}
SOURCES = {"fwd": "FWD", "bwd": "BWD", "ordered_scan_fwd": "ORDERED_SCAN_FWD", "ordered_scan_bwd": "ORDERED_SCAN_BWD",
           "ordered_conv_fwd": "ORDERED_CONV_FWD", "ordered_conv_bwd": "ORDERED_CONV_BWD", "gated_sum": "GATED_SUM",
           "token_norm_mean": "TOKEN_NORM_MEAN", "token_norm_mean_bwd": "TOKEN_NORM_MEAN_BWD",
           "gated_sum_bwd": "GATED_SUM_BWD", "rope_rms_norm": "ROPE_RMS_NORM", "rope_rms_norm_bwd": "ROPE_RMS_NORM_BWD"}


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

    src = globals()[SOURCES[kind]] % dict(N=N, T=T)
    try:
        return Checked.load_pybinding(SIGNATURES[kind], src)
    except _Rebuild:                               # the same cache entry compiles again: its binary is gone
        return Checked.load_pybinding(SIGNATURES[kind], src)


LIBRARIES = {}             # (kind, N, T) -> the cached binary this process loaded


class _Rebuild(Exception):
    """A damaged cached binary was deleted: build() loads once more."""
