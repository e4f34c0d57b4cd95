"""preprocess_volume on a 128 x 512 x 512 int16 series to 1.5 mm vs numpy and torch equivalents (same maths).

Usage: python tools/bench_volume_preprocess.py [THREADS] [ROUNDS]. The three run in interleaved rounds; medians.
"""
import os, platform, statistics, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from medge.volume import VolumeSpec, preprocess_volume

threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
torch.set_num_threads(threads)
rng = np.random.default_rng(0)
raw = rng.integers(-1024, 3071, size=(128, 512, 512), dtype=np.int16)
slopes, intercepts = np.ones(128), np.zeros(128)
spacing = (0.75, 0.75, 2.0)  # row, column, slice mm
spec = VolumeSpec(window=(40, 400), target_spacing=(1.5, 1.5, 1.5), mean=0.5, std=0.25)
shape = spec.output_shape(raw.shape, spacing)
size = shape[2:]
out = np.empty(shape, np.float32)

def medge_run():
    preprocess_volume(raw, (slopes, intercepts), spacing, spec, num_threads=threads, out=out)
    return out

def torch_run():
    x = torch.from_numpy(raw).to(torch.float32)
    x = x * torch.from_numpy(slopes).float()[:, None, None] + torch.from_numpy(intercepts).float()[:, None, None]
    y = ((x - (40 - 0.5)) / (400 - 1) + 0.5).clamp_(0, 1)  # LINEAR window
    y = F.interpolate(y[None, None], size=size, mode="trilinear", align_corners=False)
    return ((y - 0.5) / 0.25).numpy()

def linear_along(a, axis, n_out):
    n_in = a.shape[axis]
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = (src - i0).astype(np.float32)
    sh = [1] * a.ndim; sh[axis] = n_out; f = f.reshape(sh)
    return np.take(a, i0, axis=axis) * (1 - f) + np.take(a, i1, axis=axis) * f

def numpy_run():
    x = raw.astype(np.float32) * slopes.astype(np.float32)[:, None, None] + intercepts.astype(np.float32)[:, None, None]
    y = np.clip((x - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    for axis in (1, 2, 0):  # shrink in-plane first (cheapest order)
        y = linear_along(y, axis, size[axis])
    return ((y - 0.5) / 0.25)[None, None]

a, b, c = medge_run().copy(), torch_run(), numpy_run()
print("output", shape, "max |medge - torch|", float(np.abs(a - b).max()), "max |medge - numpy|", float(np.abs(a - c).max()))
times = {"medge": [], "torch": [], "numpy": []}
for r in range(rounds):  # interleaved rounds
    for name, fn in (("medge", medge_run), ("torch", torch_run), ("numpy", numpy_run)):
        t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in times.items()}
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={threads}, "
      f"load average {os.getloadavg()[0]:.1f}")
for k in times:
    print(f"{k:6s} median {med[k]*1000:8.1f} ms  (min {min(times[k])*1000:.1f})  ratio to medge {med[k]/med['medge']:.2f}")
