// Per-pixel arithmetic shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// Every function here is written so that the C++ kernels, the CUDA kernels and the torch
// fallback in chunkpose/ops/*.py perform the same IEEE operations in the same order:
//   - sampling positions are computed in double as ((a*x + b*y) + c) / ((g*x + h*y) + i),
//     exactly the expression the torch path evaluates elementwise;
//   - "nearest" rounds half to even (rint), which is what grid_sample(mode="nearest") does
//     (std::nearbyint on CPU, rint on CUDA);
//   - back-projection is ((u - cx) * z) / fx in float.
// Floating-point contraction into FMA is switched off in setup.py (-ffp-contract=off,
// nvcc --fmad=false) so that both compilers keep these roundings.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CP_HD __host__ __device__ __forceinline__
#else
#define CP_HD inline
#endif

namespace chunkpose {

// The semantics codes of xyz_crops (kept in sync with chunkpose/ops/warp.py).
constexpr int64_t kSemanticsRefiner = 0;
constexpr int64_t kSemanticsScorer = 1;

// Nearest pixel of the projective map M (row-major 3x3, double) applied to (qx, qy).
// Writes the rounded position (in the map's output frame) to (*px, *py) and returns the
// flat index into a (h, w) window starting at (x0, y0) of that frame, or -1 when the
// rounded position falls outside the window (zero padding).
CP_HD int64_t nearest_index(const double* M, double qx, double qy, int64_t x0, int64_t y0,
                            int64_t w, int64_t h, double* px, double* py) {
  const double den = (M[6] * qx + M[7] * qy) + M[8];
  const double x = rint(((M[0] * qx + M[1] * qy) + M[2]) / den);
  const double y = rint(((M[3] * qx + M[4] * qy) + M[5]) / den);
  *px = x;
  *py = y;
  const double lx = x - static_cast<double>(x0);
  const double ly = y - static_cast<double>(y0);
  // Written as a positive test so that NaN (den == 0) lands outside.
  if (lx >= 0.0 && lx <= static_cast<double>(w - 1) && ly >= 0.0 && ly <= static_cast<double>(h - 1)) {
    return static_cast<int64_t>(ly) * w + static_cast<int64_t>(lx);
  }
  return -1;
}

// Camera-frame point of pixel (u, v) at depth z; zero where z < 0.001 (invalid depth).
CP_HD void backproject(float u, float v, float z, float fx, float fy, float cx, float cy,
                       float* X, float* Y, float* Z) {
  if (z < 0.001f) {
    *X = 0.0f;
    *Y = 0.0f;
    *Z = 0.0f;
    return;
  }
  *X = (u - cx) * z / fx;
  *Y = (v - cy) * z / fy;
  *Z = z;
}

// Observed xyz seen by crop pixel (qx, qy) of one hypothesis.
// Ti: crop pixel -> full-frame pixel; T: full-frame pixel -> crop pixel (both double 3x3).
// depth is the (h, w) window of the full frame starting at (x0, y0).
//   refiner: xyz_full[nearest(Ti q)]
//   scorer:  p = nearest(Ti q); r = nearest(T p) inside the crop; z = depth[nearest(Ti r)];
//            xyz = backproject(p, z) (the crop -> full frame -> crop round trip upstream does
//            with per-hypothesis full-resolution buffers).
CP_HD void xyz_crop_pixel(const float* depth, int64_t x0, int64_t y0, int64_t w, int64_t h,
                          const double* T, const double* Ti, int64_t size, int64_t semantics,
                          float fx, float fy, float cx, float cy, double qx, double qy,
                          float* X, float* Y, float* Z) {
  double px, py;
  const int64_t p = nearest_index(Ti, qx, qy, x0, y0, w, h, &px, &py);
  float z = 0.0f;
  if (p >= 0) {
    if (semantics == kSemanticsRefiner) {
      z = depth[p];
    } else {
      double rx, ry;
      const int64_t r = nearest_index(T, px, py, 0, 0, size, size, &rx, &ry);
      if (r >= 0) {
        double mx, my;
        const int64_t m = nearest_index(Ti, rx, ry, x0, y0, w, h, &mx, &my);
        if (m >= 0) z = depth[m];
      }
    }
  }
  backproject(static_cast<float>(px), static_cast<float>(py), z, fx, fy, cx, cy, X, Y, Z);
}

// Calls visit(yy, xx, dy, dx) for every pixel of the (2 radius + 1)^2 window around
// (y, x) that lies inside the (H, W) image, rows first, in the torch path's order.
template <typename Visit>
CP_HD void for_each_window_pixel(int64_t H, int64_t W, int64_t y, int64_t x, int64_t radius, Visit&& visit) {
  for (int64_t dy = -radius; dy <= radius; ++dy) {
    const int64_t yy = y + dy;
    if (yy < 0 || yy >= H) continue;
    for (int64_t dx = -radius; dx <= radius; ++dx) {
      const int64_t xx = x + dx;
      if (xx < 0 || xx >= W) continue;
      visit(yy, xx, dy, dx);
    }
  }
}

// Erosion of one pixel (y, x) of a full (H, W) depth map: the pixel keeps its depth unless
// more than ratio_thres of the window pixels inside the image are bad (invalid, or farther
// than diff_thres from the centre). Invalid centres become 0.
CP_HD float erode_pixel(const float* depth, int64_t H, int64_t W, int64_t y, int64_t x, int64_t radius,
                        float diff_thres, float ratio_thres, float zfar) {
  const float c = depth[y * W + x];
  if (c < 0.001f || c >= zfar) return 0.0f;
  int64_t bad = 0, total = 0;
  for_each_window_pixel(H, W, y, x, radius, [&](int64_t yy, int64_t xx, int64_t, int64_t) {
    ++total;
    const float d = depth[yy * W + xx];
    if (d < 0.001f || d >= zfar || fabsf(d - c) > diff_thres) ++bad;
  });
  return (static_cast<float>(bad) / static_cast<float>(total) > ratio_thres) ? 0.0f : c;
}

// Bilateral hole-filling filter of one pixel: mean of valid window depths, then a weighted
// mean of the valid window depths within 0.01 m of it (0 where nothing is valid).
// The sums run over the window in the same (dy, dx) order as the torch path.
CP_HD float bilateral_pixel(const float* depth, int64_t H, int64_t W, int64_t y, int64_t x,
                            int64_t radius, float sigma_d, float sigma_r, float zfar) {
  float sum = 0.0f;
  int64_t n = 0;
  for_each_window_pixel(H, W, y, x, radius, [&](int64_t yy, int64_t xx, int64_t, int64_t) {
    const float d = depth[yy * W + xx];
    if (d >= 0.001f && d < zfar) {
      sum += d;
      ++n;
    }
  });
  if (n == 0) return 0.0f;
  const float mean = sum / static_cast<float>(n);
  const float c = depth[y * W + x];
  const float two_sd2 = 2.0f * sigma_d * sigma_d;
  const float two_sr2 = 2.0f * sigma_r * sigma_r;
  float sw = 0.0f, swd = 0.0f;
  for_each_window_pixel(H, W, y, x, radius, [&](int64_t yy, int64_t xx, int64_t dy, int64_t dx) {
    const float d = depth[yy * W + xx];
    if (d >= 0.001f && d < zfar && fabsf(d - mean) < 0.01f) {
      const float spatial = static_cast<float>(dx * dx + dy * dy) / two_sd2;
      const float diff = c - d;
      const float wgt = expf(-spatial - diff * diff / two_sr2);
      sw += wgt;
      swd += wgt * d;
    }
  });
  return sw > 0.0f ? swd / sw : 0.0f;
}

}  // namespace chunkpose
