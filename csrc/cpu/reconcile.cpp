// CPU launchers of the fused reconciliation op: out = main + sum_i act(norm_i(aux_i @ W_i + b_i)).
//
// Forward: per link one ATen GEMM z_i = aux_i @ W_i into a scratch tensor (no concatenation of the
// aux inputs, no per-link output), with BatchNorm one pass for its batch statistics, then ONE pass
// over the output for every link of a group: bias or BN affine, activation, the residual and the sum
// of the links (kernels/reconcile.h). Links are grouped so that the scratch stays at two [N, C]
// fp32 buffers' worth (2 links in fp32, 4 in bf16/fp16); the output is the accumulator between
// groups (an fp32 one for 16-bit dtypes with more than one group).
//
// Backward: only the weight and bias (and BN affine) gradients; main's is the incoming gradient
// (passed through by the op's autograd) and the aux inputs get none. Per link: recompute
// z = aux @ W (the forward kept only the per-channel mean and inv-std), one reduction pass, one
// pass writing dL/dz over z in place, one GEMM aux^T @ dL/dz; one [N, C] scratch at a time.
//
// Reductions run over a fixed partition of the rows (independent of the thread count) and are
// merged in order, in double: results are identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../kernels/reconcile.h"
#include "isa.h"
#include "ops.h"

namespace moe_kernels {
namespace cpu {

namespace {

namespace K = kernels::reconcile;

K::Act parse_act(std::string_view a) {
  if (a == "none") return K::Act::None;
  if (a == "relu") return K::Act::Relu;
  if (a == "gelu") return K::Act::Gelu;
  if (a == "silu") return K::Act::Silu;
  TORCH_CHECK(false, "moe_kernels cpu reconcile: unknown activation ", a);
}

template <typename F>
void dispatch_act(K::Act a, F&& f) {
  switch (a) {
    case K::Act::None: f(std::integral_constant<K::Act, K::Act::None>{}); break;
    case K::Act::Relu: f(std::integral_constant<K::Act, K::Act::Relu>{}); break;
    case K::Act::Gelu: f(std::integral_constant<K::Act, K::Act::Gelu>{}); break;
    case K::Act::Silu: f(std::integral_constant<K::Act, K::Act::Silu>{}); break;
  }
}

template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "moe_kernels cpu reconcile: dtype ", t, " is not supported natively");
  }
}

// rows per task of the elementwise passes (any partition gives the same results)
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Column sums over a fixed partition of the N rows into chunks, merged in chunk order in double:
// body(r0, r1, float scratch [fs_size], double partial [width]) accumulates one chunk.
template <typename Body>
std::vector<double> chunked_sums(int64_t N, int64_t width, int64_t fs_size, Body body) {
  const int64_t rows = std::max<int64_t>(64, (N + 255) / 256);
  const int64_t n = (N + rows - 1) / rows;
  std::vector<double> part(static_cast<size_t>(n * width), 0.0);
  at::parallel_for(0, n, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> fs(static_cast<size_t>(std::max<int64_t>(fs_size, 1)));
    for (int64_t k = k0; k < k1; ++k) body(k * rows, std::min(N, (k + 1) * rows), fs.data(), part.data() + k * width);
  });
  std::vector<double> out(static_cast<size_t>(width), 0.0);
  for (int64_t k = 0; k < n; ++k)
    for (int64_t j = 0; j < width; ++j) out[j] += part[k * width + j];
  return out;
}

// [L, C] per-link parameter as float (nullopt -> undefined tensor)
at::Tensor as_float(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

int64_t rows_of(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) n *= t.size(d);
  return n;
}

struct LinkConsts {  // u = (z - m) * s + t per channel, for every link: [L * C] each
  std::vector<float> m, s, t;
};

// The link GEMMs. On fp32 they run as 1x1 convolutions on channels-last views of the row-major
// [N, K] matrices ([1, K, N, 1] with strides (N K, 1, K, K) is exactly their memory): ATen sends
// those to oneDNN, which on the project's AMD CPU ran them 1.1-2.2x faster than at::mm (MKL takes
// its generic code path there; PLATFORM.md: 175 GFLOP/s), and it is what a plain nn.Conv2d
// composition gets. bf16/fp16 GEMMs stay on at::mm (oneDNN already, and faster than the
// convolution's weight gradient there).
bool conv_gemm(const at::Tensor& a2, int64_t C) {
  return a2.scalar_type() == at::kFloat && a2.size(0) > 0 && a2.size(1) > 0 && C > 0;
}

at::Tensor nchw_view(const at::Tensor& t2) {  // [N, K] row-major -> [1, K, N, 1] channels-last
  const int64_t N = t2.size(0), K = t2.size(1);
  return t2.as_strided({1, K, N, 1}, {N * K, 1, K, K});
}

// z [N, C] = a2 [N, Cin] @ w [Cin, C], a new tensor. w may be contiguous or the transpose of a
// contiguous [C, Cin] (a 1x1 conv weight viewed as [Cin, C]: then no copy is made for oneDNN).
at::Tensor link_gemm(const at::Tensor& a2, const at::Tensor& w) {
  const int64_t N = a2.size(0), C = w.size(1);
  if (!conv_gemm(a2, C)) return at::mm(a2, w);
  at::Tensor z4 = at::conv2d(nchw_view(a2), w.t().contiguous().view({C, a2.size(1), 1, 1}));
  if (!z4.is_contiguous(at::MemoryFormat::ChannelsLast)) z4 = z4.contiguous(at::MemoryFormat::ChannelsLast);
  return z4.permute({0, 2, 3, 1}).view({N, C});
}

// dL/dW [Cin, C] = a2^T @ gz. oneDNN's weight-gradient convolution was faster than MKL while the
// reduction over N is at least the weight's input width (N >= Cin; at N = 392, C = 2048 it took 2x MKL's
// time, at N = 1568, C = 2048 the same).
// The result has the strides of w (empty_like), as the op's fake implementation says.
at::Tensor link_wgrad(const at::Tensor& a2, const at::Tensor& gz, const at::Tensor& w) {
  const int64_t N = a2.size(0), Cin = a2.size(1), C = gz.size(1);
  if (!conv_gemm(a2, C) || N < Cin) {
    at::Tensor gw = at::empty_like(w);
    at::mm_out(gw, a2.t(), gz);
    return gw;
  }
  const auto r = at::convolution_backward(nchw_view(gz), nchw_view(a2), w.t().contiguous().view({C, Cin, 1, 1}),
                                          std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                          {false, true, false});
  at::Tensor gw = std::get<1>(r).reshape({C, Cin}).t();  // [Cin, C] view of the [C, Cin] result
  return gw.strides() == w.strides() ? gw : at::empty_like(w).copy_(gw);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reconcile(const std::optional<at::Tensor>& main, at::TensorList aux,
                                             at::TensorList weights, at::TensorList bias, std::string_view act_name,
                                             bool batch_norm, const std::optional<at::Tensor>& bn_weight,
                                             const std::optional<at::Tensor>& bn_bias, double eps) {
  const int64_t L = static_cast<int64_t>(aux.size());
  TORCH_CHECK(main || L > 0, "moe_kernels cpu reconcile: main may be None only with aux inputs");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L && (bias.empty() || static_cast<int64_t>(bias.size()) == L),
              "moe_kernels cpu reconcile: one weight (and one bias, or none) per aux input");
  const at::Tensor& ref = main ? *main : aux[0];
  const int64_t C = main ? main->size(-1) : weights[0].size(1);
  const int64_t N = rows_of(ref);
  std::vector<int64_t> shape(ref.sizes().begin(), ref.sizes().end());
  shape.back() = C;
  const auto opts = (main ? *main : weights[0]).options();
  at::Tensor out = at::empty(shape, opts);
  at::Tensor stats = at::empty({batch_norm ? L : 0, 3, C}, opts.dtype(at::kFloat));
  if (L == 0) {
    out.copy_(*main);
    return {out, stats};
  }
  TORCH_CHECK(!batch_norm || N > 1, "moe_kernels cpu reconcile: batch_norm in training mode needs more than 1 "
              "value per channel, got ", N);
  const K::Act act = parse_act(act_name);
  at::Tensor out2 = out.view({N, C});
  at::Tensor main2 = main ? main->contiguous().view({N, C}) : at::Tensor();
  std::vector<at::Tensor> aux2;
  for (int64_t i = 0; i < L; ++i) aux2.push_back(aux[i].contiguous().view({N, aux[i].size(-1)}));
  const bool has_bias = !bias.empty();

  const at::Tensor gamma = as_float(bn_weight), beta = as_float(bn_bias);
  LinkConsts k{std::vector<float>(L * C), std::vector<float>(L * C, 1.f), std::vector<float>(L * C, 0.f)};
  const bool narrow = out.scalar_type() != at::kFloat;
  const int64_t G = std::min<int64_t>(L, narrow ? 4 : 2);  // links per pass over the output
  // 16-bit output with several groups: keep the running sum in fp32 between them
  at::Tensor acc = (narrow && L > G) ? at::empty({N, C}, opts.dtype(at::kFloat)) : at::Tensor();
  float* st = stats.data_ptr<float>();

  dispatch_dtype(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    for (int64_t g0 = 0; g0 < L; g0 += G) {
      const int64_t g1 = std::min(L, g0 + G);
      std::vector<K::Term<scalar_t>> terms;
      std::vector<at::Tensor> zs;  // the group's pre-activations, freed after its pass
      for (int64_t i = g0; i < g1; ++i) {
        zs.push_back(link_gemm(aux2[i], weights[i]));
        const at::Tensor& z = zs.back();
        const scalar_t* zp = z.data_ptr<scalar_t>();
        float* m = k.m.data() + i * C;
        float* s = k.s.data() + i * C;
        float* t = k.t.data() + i * C;
        const at::Tensor b = has_bias ? bias[i].to(at::kFloat).contiguous() : at::Tensor();
        const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
        if (batch_norm) {
          std::vector<float> shift(C);
          for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<float>(zp[c]);  // row 0: against cancellation
          const auto sums = chunked_sums(N, 2 * C, 2 * C, [&](int64_t r0, int64_t r1, float* fs, double* part) {
            run_isa([&] { K::column_moments(zp, r0, r1, C, shift.data(), fs, fs + C, part, part + C); });
          });
          const float* gp = gamma.defined() ? gamma.data_ptr<float>() + i * C : nullptr;
          const float* bbp = beta.defined() ? beta.data_ptr<float>() + i * C : nullptr;
          for (int64_t c = 0; c < C; ++c) {
            const double d1 = sums[c] / N;
            const double mean = shift[c] + d1;
            const double var = std::max(sums[C + c] / N - d1 * d1, 0.0);
            const double invstd = 1.0 / std::sqrt(var + eps);
            m[c] = static_cast<float>(mean);
            s[c] = static_cast<float>(gp ? gp[c] * invstd : invstd);
            t[c] = bbp ? bbp[c] : 0.f;
            // reported mean is that of z + b (what a BatchNorm after a biased conv sees)
            st[(i * 3 + 0) * C + c] = static_cast<float>(bp ? mean + bp[c] : mean);
            st[(i * 3 + 1) * C + c] = static_cast<float>(invstd);
            st[(i * 3 + 2) * C + c] = static_cast<float>(var);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) m[c] = bp ? -bp[c] : 0.f;
        }
        terms.push_back({zp, m, s, t});
      }
      const bool first = g0 == 0, last = g1 == L;
      dispatch_act(act, [&](auto a) {
        constexpr K::Act A = decltype(a)::value;
        auto pass = [&](const auto* src, auto* dst) {
          at::parallel_for(0, N, grain_rows(C), [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(C);
            run_isa([&] {
              K::apply_rows<A, scalar_t>(src, terms.data(), static_cast<int>(terms.size()), r0, r1, C, buf.data(),
                                         dst);
            });
          });
        };
        scalar_t* o = out2.data_ptr<scalar_t>();
        const scalar_t* mp = main2.defined() ? main2.data_ptr<scalar_t>() : nullptr;
        if (!acc.defined()) {  // the output is the accumulator
          pass(first ? mp : o, o);
        } else {
          float* ap = acc.data_ptr<float>();
          if (first) pass(mp, ap);
          else if (last) pass(static_cast<const float*>(ap), o);
          else pass(static_cast<const float*>(ap), ap);
        }
      });
    }
  });
  return {out, stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> reconcile_backward(
    const at::Tensor& grad_out, at::TensorList aux, at::TensorList weights, at::TensorList bias,
    std::string_view act_name, bool batch_norm,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& stats) {
  const int64_t L = static_cast<int64_t>(aux.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L && (bias.empty() || static_cast<int64_t>(bias.size()) == L),
              "moe_kernels cpu reconcile_backward: one weight (and one bias, or none) per aux input");
  const int64_t C = grad_out.size(-1), N = rows_of(grad_out);
  const K::Act act = parse_act(act_name);
  const at::Tensor g2 = grad_out.contiguous().view({N, C});
  const bool has_bias = !bias.empty();
  std::vector<at::Tensor> gws, gbs;
  // undefined (None) where there is no BN affine parameter to differentiate
  at::Tensor ggamma = (batch_norm && bn_weight) ? at::empty({L, C}, bn_weight->options()) : at::Tensor();
  at::Tensor gbeta = (batch_norm && bn_bias) ? at::empty({L, C}, bn_bias->options()) : at::Tensor();
  std::vector<at::Tensor> aux2;
  for (int64_t i = 0; i < L; ++i) aux2.push_back(aux[i].contiguous().view({N, aux[i].size(-1)}));
  auto wgrad = [&](int64_t i, const at::Tensor& gz) { gws.push_back(link_wgrad(aux2[i], gz, weights[i])); };
  auto to_tensor = [&](const std::vector<double>& v, int64_t off, const at::Tensor& like) {
    at::Tensor t = at::empty({C}, at::kDouble);
    std::copy(v.begin() + off, v.begin() + off + C, t.data_ptr<double>());
    return t.to(like.scalar_type());
  };

  if (!batch_norm && act == K::Act::None) {  // dL/dz = grad_out for every link
    for (int64_t i = 0; i < L; ++i) wgrad(i, g2);
    if (has_bias && L) {
      std::vector<double> sb;
      dispatch_dtype(g2.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        const scalar_t* gp = g2.data_ptr<scalar_t>();
        sb = chunked_sums(N, C, C, [&](int64_t r0, int64_t r1, float* fs, double* part) {
          run_isa([&] { K::column_sums(gp, r0, r1, C, fs, part); });
        });
      });
      for (int64_t i = 0; i < L; ++i) gbs.push_back(to_tensor(sb, 0, bias[i]));
    }
    return {gws, gbs, ggamma, gbeta};
  }

  TORCH_CHECK(!batch_norm || (stats && stats->size(0) == L), "moe_kernels cpu reconcile: batch_norm backward "
              "needs the forward's [L, 3, C] statistics");
  const at::Tensor st = batch_norm ? stats->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor gamma = as_float(bn_weight), beta = as_float(bn_bias);
  dispatch_dtype(g2.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g2.data_ptr<scalar_t>();
    std::vector<float> m(C), s(C), t(C), A(C), B(C), Kc(C), zeros(C, 0.f);
    for (int64_t i = 0; i < L; ++i) {
      at::Tensor z = link_gemm(aux2[i], weights[i]);  // recompute the pre-activation
      scalar_t* zp = z.data_ptr<scalar_t>();
      const at::Tensor b = has_bias ? bias[i].to(at::kFloat).contiguous() : at::Tensor();
      const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
      dispatch_act(act, [&](auto a) {
        constexpr K::Act Ac = decltype(a)::value;
        if (!batch_norm) {
          const auto sb = chunked_sums(N, C, C, [&](int64_t r0, int64_t r1, float* fs, double* part) {
            run_isa([&] { K::act_grad_rows<Ac>(zp, gp, r0, r1, C, bp ? bp : zeros.data(), fs, part); });
          });
          if (has_bias) gbs.push_back(to_tensor(sb, 0, bias[i]));
          return;
        }
        const float* mean = st.data_ptr<float>() + (i * 3 + 0) * C;
        const float* invstd = st.data_ptr<float>() + (i * 3 + 1) * C;
        const float* gm = gamma.defined() ? gamma.data_ptr<float>() + i * C : nullptr;
        const float* bt = beta.defined() ? beta.data_ptr<float>() + i * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          m[c] = bp ? mean[c] - bp[c] : mean[c];  // the recomputed z has no bias
          s[c] = gm ? gm[c] * invstd[c] : invstd[c];
          t[c] = bt ? bt[c] : 0.f;
        }
        const auto sums = chunked_sums(N, 2 * C, 2 * C, [&](int64_t r0, int64_t r1, float* fs, double* part) {
          run_isa([&] {
            K::bn_grad_moments<Ac>(zp, gp, r0, r1, C, m.data(), s.data(), t.data(), fs, fs + C, part, part + C);
          });
        });
        std::vector<double> sgx(C);
        for (int64_t c = 0; c < C; ++c) {
          // gz = k (gu - mean(gu) - xhat mean(gu xhat)), k = gamma invstd, xhat = (z - m) invstd
          const double is = invstd[c], kk = (gm ? gm[c] : 1.0) * is;
          sgx[c] = sums[C + c] * is;
          A[c] = static_cast<float>(kk);
          B[c] = static_cast<float>(-kk * is * sgx[c] / N);
          Kc[c] = static_cast<float>(-kk * sums[c] / N);
        }
        at::parallel_for(0, N, grain_rows(C), [&](int64_t r0, int64_t r1) {
          run_isa([&] {
            K::bn_grad_rows<Ac>(zp, gp, r0, r1, C, m.data(), s.data(), t.data(), A.data(), B.data(), Kc.data());
          });
        });
        if (ggamma.defined()) ggamma[i].copy_(to_tensor(sgx, 0, ggamma));
        if (gbeta.defined()) gbeta[i].copy_(to_tensor(sums, 0, gbeta));
        if (has_bias) gbs.push_back(at::zeros_like(bias[i]));  // cancelled by the batch mean
      });
      wgrad(i, z);
    }
  });
  return {gws, gbs, ggamma, gbeta};
}

}  // namespace cpu
}  // namespace moe_kernels
