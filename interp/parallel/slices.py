"""Presets for common accelerator slices: how many devices, hosts and bytes a config gets.

    slice_ = parallel.get_slice("v5litepod-16")
    slice_.devices, slice_.hosts, slice_.hbm_bytes       # 16 chips, 4 VMs, 16 GB per chip
    mesh = parallel.abstract_mesh(config.mesh, slice_.devices)   # checkable on any machine

A JAX device is one chip on every TPU listed (v4 and v5p chips run their two TensorCores as
one "megacore" device; v5e and v6e chips have one TensorCore) and one GPU on GPU nodes. TPU
accelerator types name chips for v5e/v6e (v5litepod-16 = 16 chips) and TensorCores for v4/v5p
(v4-32 = 16 chips).

Sources (read 2026-12; re-check when Google changes them):
  * Runtime (software) versions for JAX: https://cloud.google.com/tpu/docs/runtimes
    (v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v4 and older:
    tpu-ubuntu2204-base).
  * v5e: https://cloud.google.com/tpu/docs/v5e (197 bf16 TFLOP/s, 16 GB HBM at 819 GB/s per
    chip; VMs of 1, 4 or 8 chips, multi-host slices use 4-chip VMs).
  * v6e: https://cloud.google.com/tpu/docs/v6e (918 bf16 TFLOP/s, 32 GB HBM at 1640 GB/s per
    chip; 4x4 = 16 chips on 4 VMs).
  * v5p: slice shapes from https://cloud.google.com/tpu/docs/supported-tpu-configurations
    (2x2x1 = 4 chips on one host; 4 chips per host); 459 bf16 TFLOP/s and 95 GB HBM at
    ~2765 GB/s per chip from Google's v5p announcement (as summarised on
    https://yobitel.com/knowledge-base/tpu-v5p).
  * v4: 275 bf16 TFLOP/s, 32 GiB HBM at 1200 GB/s per chip (Google's v4 page, as summarised
    on https://glennklockwood.com/garden/tpuv4); 4 chips per host.
  * H100 SXM (e.g. a3-highgpu-8g, 8 GPUs): 80 GB HBM3 at 3.35 TB/s, 989 dense bf16 TFLOP/s
    (NVIDIA's H100 datasheet).
Peak figures are the vendors'; what a job reaches is a fraction of them (see docs/real_runs.md).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Slice:
    """One accelerator slice (a TPU VM or pod slice, or a GPU node).

    Attributes:
      name: Preset name ('v5litepod-16', 'h100-8').
      platform: 'tpu' or 'gpu'.
      devices: JAX devices in the slice (chips, or GPUs); what `jax.device_count()` reports.
      hosts: Workers (VMs, processes): `jax.process_count()` on the slice.
      hbm_bytes: Accelerator memory per device, bytes (the vendor's figure).
      bf16_flops: Peak dense bfloat16 FLOP/s per device.
      hbm_bandwidth: Memory bandwidth per device, bytes/s.
      accelerator_type: gcloud's --accelerator-type ('' for GPUs).
      runtime_version: gcloud's --version / --runtime-version ('' for GPUs).
    """

    name: str
    platform: str
    devices: int
    hosts: int
    hbm_bytes: float
    bf16_flops: float
    hbm_bandwidth: float
    accelerator_type: str = ""
    runtime_version: str = ""

    @property
    def total_hbm_bytes(self) -> float:
        return self.devices * self.hbm_bytes


_GB = 1e9
_T = 1e12


def _tpu(name, chips, hosts, hbm_gb, tflops, bandwidth_gb, runtime):
    return Slice(name, "tpu", chips, hosts, hbm_gb * _GB, tflops * _T, bandwidth_gb * _GB,
                 accelerator_type=name, runtime_version=runtime)  # fmt: skip


_V4 = dict(hbm_gb=32 * 2**30 / _GB, tflops=275, bandwidth_gb=1200, runtime="tpu-ubuntu2204-base")
_V5E = dict(hbm_gb=16, tflops=197, bandwidth_gb=819, runtime="v2-alpha-tpuv5-lite")
_V5P = dict(hbm_gb=95, tflops=459, bandwidth_gb=2765, runtime="v2-alpha-tpuv5")
_V6E = dict(hbm_gb=32, tflops=918, bandwidth_gb=1640, runtime="v2-alpha-tpuv6e")

SLICES: dict[str, Slice] = {
    s.name: s
    for s in (
        _tpu("v4-8", 4, 1, **_V4),
        _tpu("v4-32", 16, 4, **_V4),
        _tpu("v5litepod-8", 8, 1, **_V5E),
        _tpu("v5litepod-16", 16, 4, **_V5E),
        _tpu("v5litepod-32", 32, 8, **_V5E),
        _tpu("v5litepod-256", 256, 64, **_V5E),
        _tpu("v5p-8", 4, 1, **_V5P),
        _tpu("v5p-32", 16, 4, **_V5P),
        _tpu("v6e-8", 8, 1, **_V6E),
        _tpu("v6e-16", 16, 4, **_V6E),
        _tpu("v6e-256", 256, 64, **_V6E),
        Slice("h100-1", "gpu", 1, 1, 80 * _GB, 989 * _T, 3350 * _GB),
        Slice("h100-8", "gpu", 8, 1, 80 * _GB, 989 * _T, 3350 * _GB),
    )
}


def get_slice(name: str) -> Slice:
    """The preset called `name`.

    Raises:
      ValueError: naming the known presets, for an unknown name.
    """
    if name not in SLICES:
        raise ValueError(f"Unknown slice {name!r}; known slices: {sorted(SLICES)}.")
    return SLICES[name]
