// chunkpose._C: torch.library operators for full-resolution depth work (CPU kernels).
//
// The operator schemas live here; CUDA kernels for the same operators are registered from
// ops_cuda.cu when the extension is built with CUDA. Fake (shape-only) kernels are
// registered from Python (chunkpose/ops/_ext.py) so the engine can trace these operators
// under FakeTensorMode. CPU loops use at::parallel_for (OpenMP in torch's CPU builds).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "pixel_math.h"

namespace chunkpose {
namespace {

void check_depth(const at::Tensor& depth, const char* name) {
  TORCH_CHECK(depth.dim() == 2, name, ": depth must be (H, W), got ", depth.sizes());
  TORCH_CHECK(depth.scalar_type() == at::kFloat, name, ": depth must be float32, got ", depth.scalar_type());
}

void check_rows(const at::Tensor& depth, int64_t row_start, int64_t row_end, const char* name) {
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= depth.size(0), name,
              ": rows [", row_start, ", ", row_end, ") outside a depth map of ", depth.size(0), " rows");
}

void depth_to_xyz_out_cpu(const at::Tensor& depth_in, double fx, double fy, double cx, double cy,
                          int64_t row_offset, at::Tensor out) {
  check_depth(depth_in, "depth_to_xyz_out");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat, "depth_to_xyz_out: out must be CPU float32");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == depth_in.size(0) && out.size(1) == depth_in.size(1) && out.size(2) == 3,
              "depth_to_xyz_out: out must be (H, W, 3) matching depth ", depth_in.sizes(), ", got ", out.sizes());
  const at::Tensor depth = depth_in.contiguous();
  const int64_t h = depth.size(0), w = depth.size(1);
  const int64_t s0 = out.stride(0), s1 = out.stride(1), s2 = out.stride(2);
  const float* d = depth.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float ffx = static_cast<float>(fx), ffy = static_cast<float>(fy);
  const float fcx = static_cast<float>(cx), fcy = static_cast<float>(cy);
  at::parallel_for(0, h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      const float v = static_cast<float>(y + row_offset);
      for (int64_t x = 0; x < w; ++x) {
        float* px = o + y * s0 + x * s1;
        backproject(static_cast<float>(x), v, d[y * w + x], ffx, ffy, fcx, fcy, px, px + s2, px + 2 * s2);
      }
    }
  });
}

void check_transforms(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.size(1) == 3 && t.size(2) == 3 && t.scalar_type() == at::kDouble,
              "xyz_crops: ", what, " must be (B, 3, 3) float64, got ", t.sizes(), " ", t.scalar_type());
}

at::Tensor xyz_crops_cpu(const at::Tensor& depth_in, const at::Tensor& transforms_in, const at::Tensor& inverses_in,
                         double fx, double fy, double cx, double cy, int64_t size, int64_t semantics, int64_t x0,
                         int64_t y0) {
  check_depth(depth_in, "xyz_crops");
  check_transforms(transforms_in, "transforms");
  check_transforms(inverses_in, "inverses");
  TORCH_CHECK(transforms_in.size(0) == inverses_in.size(0), "xyz_crops: transforms and inverses differ in length");
  TORCH_CHECK(size > 0, "xyz_crops: size must be positive");
  TORCH_CHECK(semantics == kSemanticsRefiner || semantics == kSemanticsScorer, "xyz_crops: unknown semantics code");
  const at::Tensor depth = depth_in.contiguous();
  const at::Tensor T = transforms_in.contiguous();
  const at::Tensor Ti = inverses_in.contiguous();
  const int64_t B = T.size(0), h = depth.size(0), w = depth.size(1), plane = size * size;
  at::Tensor out = at::empty({B, 3, size, size}, depth.options());
  const float* d = depth.data_ptr<float>();
  const double* tp = T.data_ptr<double>();
  const double* tip = Ti.data_ptr<double>();
  float* o = out.data_ptr<float>();
  const float ffx = static_cast<float>(fx), ffy = static_cast<float>(fy);
  const float fcx = static_cast<float>(cx), fcy = static_cast<float>(cy);
  // One work item = one crop row of one hypothesis.
  at::parallel_for(0, B * size, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / size, qy = item % size;
      float* ob = o + b * 3 * plane + qy * size;
      for (int64_t qx = 0; qx < size; ++qx) {
        xyz_crop_pixel(WindowDepth{d}, x0, y0, w, h, tp + 9 * b, tip + 9 * b, size, semantics, ffx, ffy, fcx, fcy,
                       static_cast<double>(qx), static_cast<double>(qy), ob + qx, ob + plane + qx,
                       ob + 2 * plane + qx);
      }
    }
  });
  return out;
}

void check_clean(int64_t erode_radius, int64_t bilateral_radius, const char* name) {
  TORCH_CHECK(0 <= erode_radius && erode_radius <= kMaxCleanRadius && 0 <= bilateral_radius &&
                  bilateral_radius <= kMaxCleanRadius,
              name, ": filter radii must be in 0..", kMaxCleanRadius);
}

// xyz crops whose depth is cleaned (erode + bilateral) on demand at the sampled pixels.
// raw: the raw depth of the window (wx0, wy0) + raw.shape, which holds the ROI (x0, y0, w, h)
// and the pixels the filters read around it; (H, W): the full frame (the filters' windows
// are clipped at its border).
at::Tensor xyz_crops_cleaned_cpu(const at::Tensor& raw_in, const at::Tensor& transforms_in,
                                 const at::Tensor& inverses_in, double fx, double fy, double cx, double cy,
                                 int64_t size, int64_t semantics, int64_t x0, int64_t y0, int64_t w, int64_t h,
                                 int64_t wx0, int64_t wy0, int64_t H, int64_t W, int64_t erode_radius,
                                 double diff_thres, double ratio_thres, int64_t bilateral_radius, double sigma_d,
                                 double sigma_r, double zfar) {
  check_depth(raw_in, "xyz_crops_cleaned");
  check_transforms(transforms_in, "transforms");
  check_transforms(inverses_in, "inverses");
  check_clean(erode_radius, bilateral_radius, "xyz_crops_cleaned");
  TORCH_CHECK(transforms_in.size(0) == inverses_in.size(0), "xyz_crops_cleaned: transforms and inverses differ in length");
  TORCH_CHECK(size > 0, "xyz_crops_cleaned: size must be positive");
  TORCH_CHECK(semantics == kSemanticsRefiner || semantics == kSemanticsScorer, "xyz_crops_cleaned: unknown semantics code");
  const int64_t halo = erode_radius + bilateral_radius;
  TORCH_CHECK(wx0 <= std::max<int64_t>(x0 - halo, 0) && wy0 <= std::max<int64_t>(y0 - halo, 0) &&
                  wx0 + raw_in.size(1) >= std::min<int64_t>(x0 + w + halo, W) &&
                  wy0 + raw_in.size(0) >= std::min<int64_t>(y0 + h + halo, H),
              "xyz_crops_cleaned: the raw window must hold the ROI and its filter halo");
  const at::Tensor raw = raw_in.contiguous();
  const at::Tensor T = transforms_in.contiguous();
  const at::Tensor Ti = inverses_in.contiguous();
  const int64_t B = T.size(0), plane = size * size;
  at::Tensor out = at::empty({B, 3, size, size}, raw.options());
  const CleanedDepth cleaned{RawWindow{raw.data_ptr<float>(), wx0, wy0, raw.size(1)}, H, W,
                             CleanParams{erode_radius, static_cast<float>(diff_thres), static_cast<float>(ratio_thres),
                                         bilateral_radius, static_cast<float>(sigma_d), static_cast<float>(sigma_r),
                                         static_cast<float>(zfar)}};
  const double* tp = T.data_ptr<double>();
  const double* tip = Ti.data_ptr<double>();
  float* o = out.data_ptr<float>();
  const float ffx = static_cast<float>(fx), ffy = static_cast<float>(fy);
  const float fcx = static_cast<float>(cx), fcy = static_cast<float>(cy);
  at::parallel_for(0, B * size, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / size, qy = item % size;
      float* ob = o + b * 3 * plane + qy * size;
      for (int64_t qx = 0; qx < size; ++qx) {
        xyz_crop_pixel(cleaned, x0, y0, w, h, tp + 9 * b, tip + 9 * b, size, semantics, ffx, ffy, fcx, fcy,
                       static_cast<double>(qx), static_cast<double>(qy), ob + qx, ob + plane + qx,
                       ob + 2 * plane + qx);
      }
    }
  });
  return out;
}

// Bilinear crops (B, C, size, size) float32 of image (C, h, w) (the window at (x0, y0) of the
// full frame; uint8 or float32) under inverses (B, 3, 3) float64 crop -> full-frame maps.
template <typename Pixel>
void warp_bilinear_into(const at::Tensor& image, const at::Tensor& Ti, int64_t size, int64_t x0, int64_t y0,
                        at::Tensor& out) {
  const int64_t C = image.size(0), h = image.size(1), w = image.size(2), B = Ti.size(0), plane = size * size;
  const Pixel* img = image.data_ptr<Pixel>();
  const double* tip = Ti.data_ptr<double>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * size, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / size, qy = item % size;
      for (int64_t qx = 0; qx < size; ++qx) {
        double lx, ly;
        const bool ok = crop_source_position(tip + 9 * b, static_cast<double>(qx), static_cast<double>(qy), x0, y0,
                                             &lx, &ly);
        for (int64_t c = 0; c < C; ++c) {
          o[(b * C + c) * plane + qy * size + qx] = ok ? bilinear_sample(img + c * h * w, w, h, lx, ly) : 0.0f;
        }
      }
    }
  });
}

at::Tensor warp_bilinear_cpu(const at::Tensor& image_in, const at::Tensor& inverses_in, int64_t size, int64_t x0,
                             int64_t y0) {
  TORCH_CHECK(image_in.dim() == 3, "warp_bilinear: image must be (C, H, W), got ", image_in.sizes());
  TORCH_CHECK(image_in.scalar_type() == at::kByte || image_in.scalar_type() == at::kFloat,
              "warp_bilinear: image must be uint8 or float32, got ", image_in.scalar_type());
  check_transforms(inverses_in, "inverses");
  TORCH_CHECK(size > 0, "warp_bilinear: size must be positive");
  const at::Tensor image = image_in.contiguous();
  const at::Tensor Ti = inverses_in.contiguous();
  at::Tensor out = at::empty({Ti.size(0), image.size(0), size, size}, image.options().dtype(at::kFloat));
  if (image.scalar_type() == at::kByte) {
    warp_bilinear_into<uint8_t>(image, Ti, size, x0, y0, out);
  } else {
    warp_bilinear_into<float>(image, Ti, size, x0, y0, out);
  }
  return out;
}

template <typename PixelFn>
at::Tensor filter_rows_cpu(const at::Tensor& depth_in, int64_t row_start, int64_t row_end, const char* name,
                           PixelFn fn) {
  check_depth(depth_in, name);
  check_rows(depth_in, row_start, row_end, name);
  const at::Tensor depth = depth_in.contiguous();
  const int64_t H = depth.size(0), W = depth.size(1);
  at::Tensor out = at::empty({row_end - row_start, W}, depth.options());
  const float* d = depth.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(row_start, row_end, 4, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y)
      for (int64_t x = 0; x < W; ++x) o[(y - row_start) * W + x] = fn(d, H, W, y, x);
  });
  return out;
}

at::Tensor erode_depth_cpu(const at::Tensor& depth, int64_t row_start, int64_t row_end, int64_t radius,
                           double diff_thres, double ratio_thres, double zfar) {
  const float fd = static_cast<float>(diff_thres), fr = static_cast<float>(ratio_thres);
  const float fz = static_cast<float>(zfar);
  return filter_rows_cpu(depth, row_start, row_end, "erode_depth",
                         [=](const float* d, int64_t H, int64_t W, int64_t y, int64_t x) {
                           return erode_pixel(d, H, W, y, x, radius, fd, fr, fz);
                         });
}

at::Tensor bilateral_filter_depth_cpu(const at::Tensor& depth, int64_t row_start, int64_t row_end, int64_t radius,
                                      double sigma_d, double sigma_r, double zfar) {
  const float sd = static_cast<float>(sigma_d), sr = static_cast<float>(sigma_r);
  const float fz = static_cast<float>(zfar);
  return filter_rows_cpu(depth, row_start, row_end, "bilateral_filter_depth",
                         [=](const float* d, int64_t H, int64_t W, int64_t y, int64_t x) {
                           return bilateral_pixel(d, H, W, y, x, radius, sd, sr, fz);
                         });
}

}  // namespace

TORCH_LIBRARY(chunkpose, m) {
  m.def("depth_to_xyz_out(Tensor depth, float fx, float fy, float cx, float cy, int row_offset, Tensor(a!) out) -> ()");
  m.def("xyz_crops(Tensor depth, Tensor transforms, Tensor inverses, float fx, float fy, float cx, float cy, "
        "int size, int semantics, int x0, int y0) -> Tensor");
  m.def("xyz_crops_cleaned(Tensor raw, Tensor transforms, Tensor inverses, float fx, float fy, float cx, float cy, "
        "int size, int semantics, int x0, int y0, int w, int h, int wx0, int wy0, int H, int W, int erode_radius, "
        "float diff_thres, float ratio_thres, int bilateral_radius, float sigma_d, float sigma_r, float zfar) -> Tensor");
  m.def("warp_bilinear(Tensor image, Tensor inverses, int size, int x0, int y0) -> Tensor");
  m.def("erode_depth(Tensor depth, int row_start, int row_end, int radius, float diff_thres, float ratio_thres, "
        "float zfar) -> Tensor");
  m.def("bilateral_filter_depth(Tensor depth, int row_start, int row_end, int radius, float sigma_d, "
        "float sigma_r, float zfar) -> Tensor");
}

TORCH_LIBRARY_IMPL(chunkpose, CPU, m) {
  m.impl("depth_to_xyz_out", &depth_to_xyz_out_cpu);
  m.impl("xyz_crops", &xyz_crops_cpu);
  m.impl("xyz_crops_cleaned", &xyz_crops_cleaned_cpu);
  m.impl("warp_bilinear", &warp_bilinear_cpu);
  m.impl("erode_depth", &erode_depth_cpu);
  m.impl("bilateral_filter_depth", &bilateral_filter_depth_cpu);
}

}  // namespace chunkpose

#ifdef CHUNKPOSE_WITH_CUDA
static bool has_cuda_kernels() { return true; }
#else
static bool has_cuda_kernels() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "chunkpose C++/CUDA operators (registered as torch.ops.chunkpose.*)";
  m.def("has_cuda_kernels", &has_cuda_kernels, "whether CUDA kernels were compiled in");
}
