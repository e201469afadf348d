// Autograd for the ops of ghc.cpp: `vwn_ghc::tile`, `untile`, `read`, `write`, `write_read` and `mtp_merge`, each
// an autograd node whose forward and backward call that file's forward and backward ops; harness/model/ghc_kernel.py
// calls these.
// NOTE: in C++ rather than as torch.autograd.Function in Python, whose apply and backward cost ~30 us more per op
// (a chain of write + read ops on 8 tokens, forward + backward: 145 -> 116 us per op); the tiny step on an 8-token
// window, the two alternated in one process, x0.975 at (2, 3) and (2, 8), ~0.3 ms of its ~12.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;

// ghc.cpp's op `vwn_ghc::name`, typed
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("vwn_ghc::") + name).c_str(), "")
      .typed<Signature>();
}

// save_for_backward takes tensors: an absent optional one is saved undefined and restored as absent
Tensor saved(const OptionalTensor& t) { return t.value_or(Tensor()); }
OptionalTensor restored(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// a static GHC has no projection or scale; for them the backward ops return empty tensors
Tensor if_present(const OptionalTensor& parameter, const Tensor& grad) { return parameter ? grad : Tensor(); }

using Tiles = Tensor(const Tensor&);
using Untiles = Tensor(const Tensor&, int64_t);

// x (T, n, d) -> lane tiles
struct Tile : torch::autograd::Function<Tile> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    static const auto to_tiles = kernel<Tiles>("to_tiles");
    ctx->saved_data["tokens"] = x.size(0);
    return to_tiles.call(x.contiguous());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto from_tiles = kernel<Untiles>("from_tiles");
    return {from_tiles.call(grads[0], ctx->saved_data["tokens"].toInt())};
  }
};

// lane tiles -> x (tokens, n, d)
struct Untile : torch::autograd::Function<Untile> {
  static Tensor forward(AutogradContext*, const Tensor& tiles, int64_t tokens) {
    static const auto from_tiles = kernel<Untiles>("from_tiles");
    return from_tiles.call(tiles, tokens);
  }
  static variable_list backward(AutogradContext*, variable_list grads) {
    static const auto to_tiles = kernel<Tiles>("to_tiles");
    return {to_tiles.call(grads[0].contiguous()), Tensor()};
  }
};

// h (tiles) -> x (T, m, d)
struct Read : torch::autograd::Function<Read> {
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& a, const Tensor& b,
                        const OptionalTensor& proj, const OptionalTensor& scale, double temperature, int64_t tokens,
                        double eps) {
    static const auto read_forward =
        kernel<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
                      double, int64_t, double)>("read_forward");
    ctx->save_for_backward({h, a, b, saved(proj), saved(scale)});
    ctx->saved_data["scalars"] = std::vector<double>{temperature, eps};
    return read_forward.call(h, a, b, proj, scale, temperature, tokens, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto read_backward =
        kernel<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                          const OptionalTensor&, const OptionalTensor&, double,
                                                          double, const Tensor&)>("read_backward");
    const variable_list s = ctx->get_saved_variables();
    const auto scalars = ctx->saved_data["scalars"].toDoubleVector();
    const OptionalTensor proj = restored(s[3]), scale = restored(s[4]);
    auto [grad_h, grad_a, grad_proj, grad_scale] =
        read_backward.call(s[0], s[1], s[2], proj, scale, scalars[0], scalars[1], grads[0].contiguous());
    return {grad_h, grad_a, Tensor(), if_present(proj, grad_proj), if_present(scale, grad_scale), Tensor(), Tensor(),
            Tensor()};
  }
};

// h (tiles), z (T, m, d) -> the new state (tiles)
struct Write : torch::autograd::Function<Write> {
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& z, const Tensor& a, const Tensor& b,
                        const OptionalTensor& proj, const OptionalTensor& scale, double temperature, double eps) {
    static const auto write_forward =
        kernel<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                      const OptionalTensor&, double, double)>("write_forward");
    ctx->save_for_backward({h, z, a, b, saved(proj), saved(scale)});
    ctx->saved_data["scalars"] = std::vector<double>{temperature, eps};
    return write_forward.call(h, z, a, b, proj, scale, temperature, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto write_backward =
        kernel<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
            double, double, const Tensor&)>("write_backward");
    const variable_list s = ctx->get_saved_variables();
    const auto scalars = ctx->saved_data["scalars"].toDoubleVector();
    const OptionalTensor proj = restored(s[4]), scale = restored(s[5]);
    auto [grad_h, grad_z, grad_a, grad_b, grad_proj, grad_scale] =
        write_backward.call(s[0], s[1], s[2], s[3], proj, scale, scalars[0], scalars[1], grads[0]);
    return {grad_h, grad_z, grad_a, grad_b, if_present(proj, grad_proj), if_present(scale, grad_scale), Tensor(),
            Tensor()};
  }
};

// h (tiles), z (T, m, d) -> (the write's new state (tiles), the next GHC's read of it, x (T, m, d))
struct WriteRead : torch::autograd::Function<WriteRead> {
  static variable_list forward(AutogradContext* ctx, const Tensor& h, const Tensor& z, const Tensor& a,
                               const Tensor& b, const OptionalTensor& proj, const OptionalTensor& scale,
                               double temperature, double eps, const Tensor& next_a, const Tensor& next_b,
                               const OptionalTensor& next_proj, const OptionalTensor& next_scale,
                               double next_temperature, double next_eps) {
    static const auto write_read_forward =
        kernel<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const OptionalTensor&, const OptionalTensor&, double, double,
                                          const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                          double, double)>("write_read_forward");
    auto [out, x] = write_read_forward.call(h, z, a, b, proj, scale, temperature, eps, next_a, next_b, next_proj,
                                            next_scale, next_temperature, next_eps);
    ctx->save_for_backward({h, z, out, a, b, saved(proj), saved(scale), next_a, next_b, saved(next_proj),
                            saved(next_scale)});
    ctx->saved_data["scalars"] = std::vector<double>{temperature, eps, next_temperature, next_eps};
    return {out, x};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto write_read_backward =
        kernel<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
            const OptionalTensor&, double, double, const Tensor&, const Tensor&, const OptionalTensor&,
            const OptionalTensor&, double, double, const Tensor&, const Tensor&)>("write_read_backward");
    const variable_list s = ctx->get_saved_variables();
    const auto scalars = ctx->saved_data["scalars"].toDoubleVector();
    const OptionalTensor proj = restored(s[5]), scale = restored(s[6]);
    const OptionalTensor next_proj = restored(s[9]), next_scale = restored(s[10]);
    auto [grad_h, grad_z, grad_a, grad_b, grad_proj, grad_scale, grad_next_a, grad_next_proj, grad_next_scale] =
        write_read_backward.call(s[0], s[1], s[2], s[3], s[4], proj, scale, scalars[0], scalars[1], s[7], s[8],
                                 next_proj, next_scale, scalars[2], scalars[3], grads[0], grads[1].contiguous());
    return {grad_h, grad_z, grad_a, grad_b, if_present(proj, grad_proj), if_present(scale, grad_scale), Tensor(),
            Tensor(), grad_next_a, Tensor(), if_present(next_proj, grad_next_proj),
            if_present(next_scale, grad_next_scale), Tensor(), Tensor()};
  }
};

// hidden (lane tiles), embed (T, n, d) -> the MTP module's merged state (lane tiles)
struct MtpMerge : torch::autograd::Function<MtpMerge> {
  static Tensor forward(AutogradContext* ctx, const Tensor& hidden, const Tensor& embed, const Tensor& gamma_h,
                        const Tensor& gamma_e, const Tensor& weight, double eps) {
    static const auto mtp_merge_forward =
        kernel<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, double)>("mtp_merge_forward");
    auto [tiles, rstd_h, rstd_e] = mtp_merge_forward.call(hidden, embed, gamma_h, gamma_e, weight, eps);
    ctx->save_for_backward({hidden, embed, gamma_h, gamma_e, weight, rstd_h, rstd_e});
    return tiles;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto mtp_merge_backward =
        kernel<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&)>("mtp_merge_backward");
    const variable_list s = ctx->get_saved_variables();
    auto [grad_h, grad_e, grad_gamma_h, grad_gamma_e, grad_weight] =
        mtp_merge_backward.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    return {grad_h, grad_e, grad_gamma_h, grad_gamma_e, grad_weight, Tensor()};
  }
};

Tensor tile(const Tensor& x) { return Tile::apply(x); }
Tensor untile(const Tensor& tiles, int64_t tokens) { return Untile::apply(tiles, tokens); }
Tensor read(const Tensor& h, const Tensor& a, const Tensor& b, const OptionalTensor& proj, const OptionalTensor& scale,
            double temperature, int64_t tokens, double eps) {
  return Read::apply(h, a, b, proj, scale, temperature, tokens, eps);
}
Tensor write(const Tensor& h, const Tensor& z, const Tensor& a, const Tensor& b, const OptionalTensor& proj,
             const OptionalTensor& scale, double temperature, double eps) {
  return Write::apply(h, z, a, b, proj, scale, temperature, eps);
}
std::tuple<Tensor, Tensor> write_read(const Tensor& h, const Tensor& z, const Tensor& a, const Tensor& b,
                                      const OptionalTensor& proj, const OptionalTensor& scale, double temperature,
                                      double eps, const Tensor& next_a, const Tensor& next_b,
                                      const OptionalTensor& next_proj, const OptionalTensor& next_scale,
                                      double next_temperature, double next_eps) {
  const variable_list out = WriteRead::apply(h, z, a, b, proj, scale, temperature, eps, next_a, next_b, next_proj,
                                             next_scale, next_temperature, next_eps);
  return {out[0], out[1]};
}
Tensor mtp_merge(const Tensor& hidden, const Tensor& embed, const Tensor& gamma_h, const Tensor& gamma_e,
                 const Tensor& weight, double eps) {
  return MtpMerge::apply(hidden, embed, gamma_h, gamma_e, weight, eps);
}

void implement(torch::Library& lib) {
  lib.impl("tile", &tile);
  lib.impl("untile", &untile);
  lib.impl("read", &read);
  lib.impl("write", &write);
  lib.impl("write_read", &write_read);
  lib.impl("mtp_merge", &mtp_merge);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vwn_ghc, lib) {
  lib.def("tile(Tensor x) -> Tensor");
  lib.def("untile(Tensor tiles, int tokens) -> Tensor");
  lib.def("read(Tensor h, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, int tokens, float eps)"
          " -> Tensor");
  lib.def("write(Tensor h, Tensor z, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, float eps)"
          " -> Tensor");
  lib.def("write_read(Tensor h, Tensor z, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, "
          "float eps, Tensor next_a, Tensor next_b, Tensor? next_proj, Tensor? next_scale, float next_temperature, "
          "float next_eps) -> (Tensor, Tensor)");
  lib.def("mtp_merge(Tensor hidden, Tensor embed, Tensor gamma_h, Tensor gamma_e, Tensor weight, float eps)"
          " -> Tensor");
}

// NOTE: also CompositeExplicitAutograd, where calls land when dispatch skips autograd (inference mode, which
// Lightning's validation runs in); Function::apply records no node when grad mode is off.
TORCH_LIBRARY_IMPL(vwn_ghc, Autograd, lib) { implement(lib); }
TORCH_LIBRARY_IMPL(vwn_ghc, CompositeExplicitAutograd, lib) { implement(lib); }
