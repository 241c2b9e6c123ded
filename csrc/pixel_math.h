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
// The observed depth covers the (h, w) window of the full frame starting at (x0, y0);
// depth_at(p, px, py) returns it at window index p = full-frame pixel (px, py).
//   refiner: xyz_full[nearest(Ti q)]
//   scorer:  p = nearest(Ti q); r = nearest(T p) inside the crop; z = depth[nearest(Ti r)];
//            xyz = backproject(p, z) (the crop -> full frame -> crop round trip upstream does
//            with per-hypothesis full-resolution buffers).
template <typename DepthAt>
CP_HD void xyz_crop_pixel(const DepthAt& depth_at, int64_t x0, int64_t y0, int64_t w, int64_t h,
                          const double* T, const double* Ti, int64_t size, int64_t semantics,
                          float fx, float fy, float cx, float cy, double qx, double qy,
                          float* X, float* Y, float* Z) {
  double px, py;
  const int64_t p = nearest_index(Ti, qx, qy, x0, y0, w, h, &px, &py);
  float z = 0.0f;
  if (p >= 0) {
    if (semantics == kSemanticsRefiner) {
      z = depth_at(p, px, py);
    } else {
      double rx, ry;
      const int64_t r = nearest_index(T, px, py, 0, 0, size, size, &rx, &ry);
      if (r >= 0) {
        double mx, my;
        const int64_t m = nearest_index(Ti, rx, ry, x0, y0, w, h, &mx, &my);
        if (m >= 0) z = depth_at(m, mx, my);
      }
    }
  }
  backproject(static_cast<float>(px), static_cast<float>(py), z, fx, fy, cx, cy, X, Y, Z);
}

// Depth of a dense (h, w) window: index p is the window's flat index.
struct WindowDepth {
  const float* depth;
  CP_HD float operator()(int64_t p, double, double) const { return depth[p]; }
};

// Bilinear sample of channel plane (h, w) at window position (lx, ly) with zero padding,
// the corners accumulated in double in the order (x0,y0), (x1,y0), (x0,y1), (x1,y1).
template <typename Pixel>
CP_HD float bilinear_sample(const Pixel* plane, int64_t w, int64_t h, double lx, double ly) {
  const double fx = floor(lx), fy = floor(ly);
  const double ax = lx - fx, ay = ly - fy;
  const double bx = 1.0 - ax, by = 1.0 - ay;
  const int64_t ix = static_cast<int64_t>(fx), iy = static_cast<int64_t>(fy);
  double v = 0.0;
  const bool x0_in = ix >= 0 && ix <= w - 1, x1_in = ix + 1 >= 0 && ix + 1 <= w - 1;
  const bool y0_in = iy >= 0 && iy <= h - 1, y1_in = iy + 1 >= 0 && iy + 1 <= h - 1;
  if (y0_in && x0_in) v = v + (bx * by) * static_cast<double>(plane[iy * w + ix]);
  if (y0_in && x1_in) v = v + (ax * by) * static_cast<double>(plane[iy * w + ix + 1]);
  if (y1_in && x0_in) v = v + (bx * ay) * static_cast<double>(plane[(iy + 1) * w + ix]);
  if (y1_in && x1_in) v = v + (ax * ay) * static_cast<double>(plane[(iy + 1) * w + ix + 1]);
  return static_cast<float>(v);
}

// Window position (lx, ly) of crop pixel (qx, qy) under the inverse transform Ti (crop ->
// full frame), in the (w, h) window starting at (x0, y0); false when not finite (den == 0).
CP_HD bool crop_source_position(const double* Ti, double qx, double qy, int64_t x0, int64_t y0, double* lx,
                                double* ly) {
  const double den = (Ti[6] * qx + Ti[7] * qy) + Ti[8];
  const double x = ((Ti[0] * qx + Ti[1] * qy) + Ti[2]) / den;
  const double y = ((Ti[3] * qx + Ti[4] * qy) + Ti[5]) / den;
  *lx = x - static_cast<double>(x0);
  *ly = y - static_cast<double>(y0);
  return (x - x == 0.0) && (y - y == 0.0);  // false for inf and NaN
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

// Reads a dense (H, W) map at full-frame (y, x).
struct DenseFetch {
  const float* depth;
  int64_t W;
  CP_HD float operator()(int64_t y, int64_t x) const { return depth[y * W + x]; }
};

// Erosion of one pixel (y, x) of a full (H, W) depth map read through raw(yy, xx): the pixel
// keeps its depth unless more than ratio_thres of the window pixels inside the image are bad
// (invalid, or farther than diff_thres from the centre). Invalid centres become 0.
template <typename Fetch>
CP_HD float erode_at(const Fetch& raw, int64_t H, int64_t W, int64_t y, int64_t x, int64_t radius,
                     float diff_thres, float ratio_thres, float zfar) {
  const float c = raw(y, x);
  if (c < 0.001f || c >= zfar) return 0.0f;
  int64_t bad = 0, total = 0;
  for_each_window_pixel(H, W, y, x, radius, [&](int64_t yy, int64_t xx, int64_t, int64_t) {
    ++total;
    const float d = raw(yy, xx);
    if (d < 0.001f || d >= zfar || fabsf(d - c) > diff_thres) ++bad;
  });
  return (static_cast<float>(bad) / static_cast<float>(total) > ratio_thres) ? 0.0f : c;
}

CP_HD float erode_pixel(const float* depth, int64_t H, int64_t W, int64_t y, int64_t x, int64_t radius,
                        float diff_thres, float ratio_thres, float zfar) {
  return erode_at(DenseFetch{depth, W}, H, W, y, x, radius, diff_thres, ratio_thres, zfar);
}

// Bilateral hole-filling filter of one pixel: mean of valid window depths, then a weighted
// mean of the valid window depths within 0.01 m of it (0 where nothing is valid).
// The sums run over the window in the same (dy, dx) order as the torch path.
template <typename Fetch>
CP_HD float bilateral_at(const Fetch& depth, int64_t H, int64_t W, int64_t y, int64_t x, int64_t radius,
                         float sigma_d, float sigma_r, float zfar) {
  float sum = 0.0f;
  int64_t n = 0;
  for_each_window_pixel(H, W, y, x, radius, [&](int64_t yy, int64_t xx, int64_t, int64_t) {
    const float d = depth(yy, xx);
    if (d >= 0.001f && d < zfar) {
      sum += d;
      ++n;
    }
  });
  if (n == 0) return 0.0f;
  const float mean = sum / static_cast<float>(n);
  const float c = depth(y, x);
  const float two_sd2 = 2.0f * sigma_d * sigma_d;
  const float two_sr2 = 2.0f * sigma_r * sigma_r;
  float sw = 0.0f, swd = 0.0f;
  for_each_window_pixel(H, W, y, x, radius, [&](int64_t yy, int64_t xx, int64_t dy, int64_t dx) {
    const float d = depth(yy, xx);
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

CP_HD float bilateral_pixel(const float* depth, int64_t H, int64_t W, int64_t y, int64_t x,
                            int64_t radius, float sigma_d, float sigma_r, float zfar) {
  return bilateral_at(DenseFetch{depth, W}, H, W, y, x, radius, sigma_d, sigma_r, zfar);
}

// The largest filter radius the on-demand clean-up supports (upstream uses 2).
constexpr int64_t kMaxCleanRadius = 4;

// Parameters of the two clean-up filters (erode, then bilateral).
struct CleanParams {
  int64_t erode_radius;
  float diff_thres, ratio_thres;
  int64_t bilateral_radius;
  float sigma_d, sigma_r, zfar;
};

// Raw depth of a window (w, h) starting at full-frame (x0, y0), read at full-frame (y, x).
struct RawWindow {
  const float* depth;
  int64_t x0, y0, w;
  CP_HD float operator()(int64_t y, int64_t x) const { return depth[(y - y0) * w + (x - x0)]; }
};

// Eroded values of the bilateral window around (y, x), computed on the spot.
struct ErodedWindow {
  const float* values;  // (2 r + 1)^2, row-major around (y, x)
  int64_t y, x, r;
  CP_HD float operator()(int64_t yy, int64_t xx) const { return values[(yy - y + r) * (2 * r + 1) + (xx - x + r)]; }
};

// Cleaned depth (erode, then bilateral, exactly as the dense filters of an (H, W) frame) at
// full-frame pixel (y, x), from raw depth that covers every pixel the two windows read.
CP_HD float cleaned_depth_at(const RawWindow& raw, int64_t H, int64_t W, int64_t y, int64_t x,
                             const CleanParams& prm) {
  float eroded[(2 * kMaxCleanRadius + 1) * (2 * kMaxCleanRadius + 1)];
  const int64_t r = prm.bilateral_radius;
  for_each_window_pixel(H, W, y, x, r, [&](int64_t yy, int64_t xx, int64_t dy, int64_t dx) {
    eroded[(dy + r) * (2 * r + 1) + (dx + r)] =
        erode_at(raw, H, W, yy, xx, prm.erode_radius, prm.diff_thres, prm.ratio_thres, prm.zfar);
  });
  return bilateral_at(ErodedWindow{eroded, y, x, r}, H, W, y, x, r, prm.sigma_d, prm.sigma_r, prm.zfar);
}

// Depth cleaned on demand at the pixels crops sample: the sampled pixel's full-frame
// position (px, py) is what is cleaned (the window index is not needed).
struct CleanedDepth {
  RawWindow raw;
  int64_t H, W;
  CleanParams params;
  CP_HD float operator()(int64_t, double px, double py) const {
    return cleaned_depth_at(raw, H, W, static_cast<int64_t>(py), static_cast<int64_t>(px), params);
  }
};

}  // namespace chunkpose
