// CUDA kernels for the chunkpose operators declared in ops.cpp. One thread per output
// pixel; the arithmetic is the shared per-pixel code in pixel_math.h, compiled with
// --fmad=false so results equal the CPU kernels and the torch path.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "pixel_math.h"

namespace chunkpose {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

__global__ void depth_to_xyz_kernel(const float* __restrict__ depth, int64_t h, int64_t w, int64_t row_offset,
                                    float fx, float fy, float cx, float cy, float* __restrict__ out, int64_t s0,
                                    int64_t s1, int64_t s2) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= h * w) return;
  const int64_t y = i / w, x = i % w;
  float* o = out + y * s0 + x * s1;
  backproject(static_cast<float>(x), static_cast<float>(y + row_offset), depth[i], fx, fy, cx, cy, o, o + s2,
              o + 2 * s2);
}

__global__ void xyz_crops_kernel(const float* __restrict__ depth, int64_t x0, int64_t y0, int64_t w, int64_t h,
                                 const double* __restrict__ T, const double* __restrict__ Ti, int64_t B,
                                 int64_t size, int64_t semantics, float fx, float fy, float cx, float cy,
                                 float* __restrict__ out) {
  const int64_t plane = size * size;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * plane) return;
  const int64_t b = i / plane, rem = i % plane;
  const int64_t qy = rem / size, qx = rem % size;
  float* o = out + b * 3 * plane + rem;
  xyz_crop_pixel(WindowDepth{depth}, x0, y0, w, h, T + 9 * b, Ti + 9 * b, size, semantics, fx, fy, cx, cy,
                 static_cast<double>(qx), static_cast<double>(qy), o, o + plane, o + 2 * plane);
}

__global__ void xyz_crops_cleaned_kernel(CleanedDepth cleaned, int64_t x0, int64_t y0, int64_t w, int64_t h,
                                         const double* __restrict__ T, const double* __restrict__ Ti, int64_t B,
                                         int64_t size, int64_t semantics, float fx, float fy, float cx, float cy,
                                         float* __restrict__ out) {
  const int64_t plane = size * size;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * plane) return;
  const int64_t b = i / plane, rem = i % plane;
  const int64_t qy = rem / size, qx = rem % size;
  float* o = out + b * 3 * plane + rem;
  xyz_crop_pixel(cleaned, x0, y0, w, h, T + 9 * b, Ti + 9 * b, size, semantics, fx, fy, cx, cy,
                 static_cast<double>(qx), static_cast<double>(qy), o, o + plane, o + 2 * plane);
}

template <typename Pixel>
__global__ void warp_bilinear_kernel(const Pixel* __restrict__ image, int64_t C, int64_t h, int64_t w,
                                     const double* __restrict__ Ti, int64_t B, int64_t size, int64_t x0, int64_t y0,
                                     float* __restrict__ out) {
  const int64_t plane = size * size;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * plane) return;
  const int64_t b = i / plane, rem = i % plane;
  const int64_t qy = rem / size, qx = rem % size;
  double lx, ly;
  const bool ok = crop_source_position(Ti + 9 * b, static_cast<double>(qx), static_cast<double>(qy), x0, y0, &lx, &ly);
  for (int64_t c = 0; c < C; ++c) {
    out[(b * C + c) * plane + rem] = ok ? bilinear_sample(image + c * h * w, w, h, lx, ly) : 0.0f;
  }
}

__global__ void erode_kernel(const float* __restrict__ depth, int64_t H, int64_t W, int64_t row_start,
                             int64_t rows, int64_t radius, float diff_thres, float ratio_thres, float zfar,
                             float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * W) return;
  const int64_t y = row_start + i / W, x = i % W;
  out[i] = erode_pixel(depth, H, W, y, x, radius, diff_thres, ratio_thres, zfar);
}

__global__ void bilateral_kernel(const float* __restrict__ depth, int64_t H, int64_t W, int64_t row_start,
                                 int64_t rows, int64_t radius, float sigma_d, float sigma_r, float zfar,
                                 float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * W) return;
  const int64_t y = row_start + i / W, x = i % W;
  out[i] = bilateral_pixel(depth, H, W, y, x, radius, sigma_d, sigma_r, zfar);
}

void check_cuda_depth(const at::Tensor& depth, const char* name) {
  TORCH_CHECK(depth.is_cuda() && depth.dim() == 2 && depth.scalar_type() == at::kFloat, name,
              ": depth must be a CUDA float32 (H, W) tensor, got ", depth.sizes(), " ", depth.scalar_type());
}

void depth_to_xyz_out_cuda(const at::Tensor& depth_in, double fx, double fy, double cx, double cy,
                           int64_t row_offset, at::Tensor out) {
  check_cuda_depth(depth_in, "depth_to_xyz_out");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kFloat && out.dim() == 3 && out.size(0) == depth_in.size(0) &&
                  out.size(1) == depth_in.size(1) && out.size(2) == 3,
              "depth_to_xyz_out: out must be CUDA float32 (H, W, 3) matching depth");
  TORCH_CHECK(out.device() == depth_in.device(), "depth_to_xyz_out: depth and out on different devices");
  const c10::cuda::CUDAGuard guard(depth_in.device());
  const at::Tensor depth = depth_in.contiguous();
  const int64_t h = depth.size(0), w = depth.size(1);
  if (h * w == 0) return;
  depth_to_xyz_kernel<<<blocks_for(h * w), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      depth.data_ptr<float>(), h, w, row_offset, static_cast<float>(fx), static_cast<float>(fy),
      static_cast<float>(cx), static_cast<float>(cy), out.data_ptr<float>(), out.stride(0), out.stride(1),
      out.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor xyz_crops_cuda(const at::Tensor& depth_in, const at::Tensor& transforms_in, const at::Tensor& inverses_in,
                          double fx, double fy, double cx, double cy, int64_t size, int64_t semantics, int64_t x0,
                          int64_t y0) {
  check_cuda_depth(depth_in, "xyz_crops");
  TORCH_CHECK(transforms_in.is_cuda() && inverses_in.is_cuda() && transforms_in.scalar_type() == at::kDouble &&
                  inverses_in.scalar_type() == at::kDouble && transforms_in.dim() == 3 &&
                  transforms_in.size(1) == 3 && transforms_in.size(2) == 3 &&
                  inverses_in.sizes() == transforms_in.sizes(),
              "xyz_crops: transforms and inverses must be CUDA float64 (B, 3, 3)");
  TORCH_CHECK(transforms_in.device() == depth_in.device() && inverses_in.device() == depth_in.device(),
              "xyz_crops: depth, transforms and inverses must be on the same device");
  TORCH_CHECK(size > 0, "xyz_crops: size must be positive");
  TORCH_CHECK(semantics == kSemanticsRefiner || semantics == kSemanticsScorer, "xyz_crops: unknown semantics code");
  const c10::cuda::CUDAGuard guard(depth_in.device());
  const at::Tensor depth = depth_in.contiguous();
  const at::Tensor T = transforms_in.contiguous();
  const at::Tensor Ti = inverses_in.contiguous();
  const int64_t B = T.size(0), plane = size * size;
  at::Tensor out = at::empty({B, 3, size, size}, depth.options());
  if (B == 0) return out;
  xyz_crops_kernel<<<blocks_for(B * plane), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      depth.data_ptr<float>(), x0, y0, depth.size(1), depth.size(0), T.data_ptr<double>(), Ti.data_ptr<double>(), B,
      size, semantics, static_cast<float>(fx), static_cast<float>(fy), static_cast<float>(cx), static_cast<float>(cy),
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor xyz_crops_cleaned_cuda(const at::Tensor& raw_in, const at::Tensor& transforms_in,
                                  const at::Tensor& inverses_in, double fx, double fy, double cx, double cy,
                                  int64_t size, int64_t semantics, int64_t x0, int64_t y0, int64_t w, int64_t h,
                                  int64_t wx0, int64_t wy0, int64_t H, int64_t W, int64_t erode_radius,
                                  double diff_thres, double ratio_thres, int64_t bilateral_radius, double sigma_d,
                                  double sigma_r, double zfar) {
  check_cuda_depth(raw_in, "xyz_crops_cleaned");
  TORCH_CHECK(transforms_in.is_cuda() && inverses_in.is_cuda() && transforms_in.scalar_type() == at::kDouble &&
                  inverses_in.scalar_type() == at::kDouble && transforms_in.dim() == 3 &&
                  transforms_in.size(1) == 3 && transforms_in.size(2) == 3 &&
                  inverses_in.sizes() == transforms_in.sizes(),
              "xyz_crops_cleaned: transforms and inverses must be CUDA float64 (B, 3, 3)");
  TORCH_CHECK(transforms_in.device() == raw_in.device() && inverses_in.device() == raw_in.device(),
              "xyz_crops_cleaned: raw, transforms and inverses must be on the same device");
  TORCH_CHECK(0 <= erode_radius && erode_radius <= kMaxCleanRadius && 0 <= bilateral_radius &&
                  bilateral_radius <= kMaxCleanRadius,
              "xyz_crops_cleaned: filter radii must be in 0..", kMaxCleanRadius);
  TORCH_CHECK(size > 0, "xyz_crops_cleaned: size must be positive");
  TORCH_CHECK(semantics == kSemanticsRefiner || semantics == kSemanticsScorer,
              "xyz_crops_cleaned: unknown semantics code");
  const c10::cuda::CUDAGuard guard(raw_in.device());
  const at::Tensor raw = raw_in.contiguous();
  const at::Tensor T = transforms_in.contiguous();
  const at::Tensor Ti = inverses_in.contiguous();
  const int64_t B = T.size(0), plane = size * size;
  at::Tensor out = at::empty({B, 3, size, size}, raw.options());
  if (B == 0) return out;
  const CleanedDepth cleaned{RawWindow{raw.data_ptr<float>(), wx0, wy0, raw.size(1)}, H, W,
                             CleanParams{erode_radius, static_cast<float>(diff_thres), static_cast<float>(ratio_thres),
                                         bilateral_radius, static_cast<float>(sigma_d), static_cast<float>(sigma_r),
                                         static_cast<float>(zfar)}};
  xyz_crops_cleaned_kernel<<<blocks_for(B * plane), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      cleaned, x0, y0, w, h, T.data_ptr<double>(), Ti.data_ptr<double>(), B, size, semantics, static_cast<float>(fx),
      static_cast<float>(fy), static_cast<float>(cx), static_cast<float>(cy), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor warp_bilinear_cuda(const at::Tensor& image_in, const at::Tensor& inverses_in, int64_t size, int64_t x0,
                              int64_t y0) {
  TORCH_CHECK(image_in.is_cuda() && image_in.dim() == 3 &&
                  (image_in.scalar_type() == at::kByte || image_in.scalar_type() == at::kFloat),
              "warp_bilinear: image must be a CUDA uint8 or float32 (C, H, W) tensor");
  TORCH_CHECK(inverses_in.is_cuda() && inverses_in.scalar_type() == at::kDouble && inverses_in.dim() == 3 &&
                  inverses_in.size(1) == 3 && inverses_in.size(2) == 3 && inverses_in.device() == image_in.device(),
              "warp_bilinear: inverses must be CUDA float64 (B, 3, 3) on the image's device");
  TORCH_CHECK(size > 0, "warp_bilinear: size must be positive");
  const c10::cuda::CUDAGuard guard(image_in.device());
  const at::Tensor image = image_in.contiguous();
  const at::Tensor Ti = inverses_in.contiguous();
  const int64_t B = Ti.size(0), C = image.size(0), plane = size * size;
  at::Tensor out = at::empty({B, C, size, size}, image.options().dtype(at::kFloat));
  if (B == 0) return out;
  if (image.scalar_type() == at::kByte) {
    warp_bilinear_kernel<uint8_t><<<blocks_for(B * plane), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        image.data_ptr<uint8_t>(), C, image.size(1), image.size(2), Ti.data_ptr<double>(), B, size, x0, y0,
        out.data_ptr<float>());
  } else {
    warp_bilinear_kernel<float><<<blocks_for(B * plane), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        image.data_ptr<float>(), C, image.size(1), image.size(2), Ti.data_ptr<double>(), B, size, x0, y0,
        out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor erode_depth_cuda(const at::Tensor& depth_in, int64_t row_start, int64_t row_end, int64_t radius,
                            double diff_thres, double ratio_thres, double zfar) {
  check_cuda_depth(depth_in, "erode_depth");
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= depth_in.size(0), "erode_depth: bad row range");
  const c10::cuda::CUDAGuard guard(depth_in.device());
  const at::Tensor depth = depth_in.contiguous();
  const int64_t H = depth.size(0), W = depth.size(1), rows = row_end - row_start;
  at::Tensor out = at::empty({rows, W}, depth.options());
  if (rows * W == 0) return out;
  erode_kernel<<<blocks_for(rows * W), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      depth.data_ptr<float>(), H, W, row_start, rows, radius, static_cast<float>(diff_thres),
      static_cast<float>(ratio_thres), static_cast<float>(zfar), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bilateral_filter_depth_cuda(const at::Tensor& depth_in, int64_t row_start, int64_t row_end, int64_t radius,
                                       double sigma_d, double sigma_r, double zfar) {
  check_cuda_depth(depth_in, "bilateral_filter_depth");
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= depth_in.size(0),
              "bilateral_filter_depth: bad row range");
  const c10::cuda::CUDAGuard guard(depth_in.device());
  const at::Tensor depth = depth_in.contiguous();
  const int64_t H = depth.size(0), W = depth.size(1), rows = row_end - row_start;
  at::Tensor out = at::empty({rows, W}, depth.options());
  if (rows * W == 0) return out;
  bilateral_kernel<<<blocks_for(rows * W), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      depth.data_ptr<float>(), H, W, row_start, rows, radius, static_cast<float>(sigma_d),
      static_cast<float>(sigma_r), static_cast<float>(zfar), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chunkpose, CUDA, m) {
  m.impl("depth_to_xyz_out", &depth_to_xyz_out_cuda);
  m.impl("xyz_crops", &xyz_crops_cuda);
  m.impl("xyz_crops_cleaned", &xyz_crops_cleaned_cuda);
  m.impl("warp_bilinear", &warp_bilinear_cuda);
  m.impl("erode_depth", &erode_depth_cuda);
  m.impl("bilateral_filter_depth", &bilateral_filter_depth_cuda);
}

}  // namespace chunkpose
