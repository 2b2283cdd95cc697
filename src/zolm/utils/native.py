"""The native kernels of zolm (``zolm/kernels/*.c``): compiled with gcc on first use, cached, loaded with ctypes.

The library is built with ``-O3 -march=native -ffp-contract=off -fopenmp`` (no FMA contraction: each kernel
rounds as its torch mirror does) into ``$ZOLM_CACHE/kernels`` (default ``~/.cache/zolm``), keyed by the sources,
the compiler version, the flags and the CPU's feature flags, so a shared home directory never runs a binary built
for another CPU. Without a compiler :func:`lib` returns None (with one
warning) and every caller falls back to a torch implementation that gives the same bits, more slowly.
``ZOLM_KERNEL=torch`` forces that fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

from zolm.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)
_i64, _u32, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "zolm_axpy_f32": [_ptr, _i64, _i64, _u32, _u32, _f32, _int, _ptr, _int],
    "zolm_draw_f32": [_ptr, _i64, _i64, _u32, _u32, _int, _int],
    "zolm_axpy2_f32": [_ptr, _i64, _i64, _u32, _u32, _f32, _f32, _int, _ptr, _int],
    "zolm_axpy_half": [_ptr, _i64, _i64, _u32, _u32, _f32, _f32, _int, _int, _ptr, _int, _int],
    "zolm_perturb_half": [_ptr, _ptr, _int, _i64, _i64, _u32, _u32, _f32, _int, _ptr, _int, _int],
    "zolm_master_step": [_ptr, _ptr, _i64, _i64, _u32, _u32, _f32, _f32, _int, _ptr, _int, _int],
    "zolm_sr_step_half": [_ptr, _i64, _i64, _u32, _u32, _f32, _f32, _int, _u32, _u32, _ptr, _int, _int],
    "zolm_quzo_perturb_f32": [_ptr, _i64, _u32, _u32, _u32, _u32, _f32, ctypes.c_int32, _ptr, _int],
    "zolm_quzo_update_int8": [_ptr, _i64, _i64, _i64, _ptr, _u32, _u32, _u32, _u32, _u32, _u32, _f32,
                              ctypes.c_int32, _int, _ptr, ctypes.c_int32, ctypes.c_int32, _int],
    "zolm_quzo_update_int4": [_ptr, _i64, _i64, _i64, _ptr, _u32, _u32, _u32, _u32, _u32, _u32, _f32,
                              ctypes.c_int32, _int, _ptr, _int],
    "zolm_quzo_dequant_perturb_lut8": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _u32, _u32, _u32, _u32, _f32,
                                       ctypes.c_int32, _ptr, _int],
    "zolm_quzo_dequant_perturb_int4": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _u32, _u32, _u32, _u32, _f32,
                                       ctypes.c_int32, _ptr, _int],
    "zolm_dequant_lut8": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
    "zolm_dequant_int4": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
    "zolm_fake_quant_f32": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _f32, _f32, _int],
}


class _Native:
    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.tried = False

    def get(self) -> ctypes.CDLL | None:
        if os.environ.get("ZOLM_KERNEL", "auto") == "torch":
            return None
        if not self.tried:
            self.tried = True
            try:
                self.lib = _build()
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("zolm: native kernels unavailable (%s); using the slower torch implementations", e)
        return self.lib


def _build() -> ctypes.CDLL:
    srcs = sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.c"))
    cc = os.environ.get("CC", "gcc")
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    headers = sorted(srcs[0].parent.glob("*.h")) if srcs else []
    text = "".join(s.read_text() for s in srcs + headers)  # a header change rebuilds too
    tag = hashlib.sha256("\0".join([text, version, " ".join(flags), cpu, platform.machine()]).encode()).hexdigest()
    cache = Path(os.environ.get("ZOLM_CACHE", Path.home() / ".cache" / "zolm")) / "kernels"
    so = cache / f"zolm-{tag[:16]}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.so")
        subprocess.run([cc, *flags, *map(str, srcs), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                       timeout=180)
        atomic_write_bytes(so, tmp.read_bytes())
        tmp.unlink()
    lib = ctypes.CDLL(str(so))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


_NATIVE = _Native()


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (no compiler, or ``ZOLM_KERNEL=torch``)."""
    return _NATIVE.get()


PARALLEL_MIN = 1 << 15  # below this many elements a kernel runs on one thread (no OpenMP team to wake)


def threads(n: int) -> int:
    """OpenMP threads for a kernel over ``n`` elements: torch's thread count, or 1 for small tensors (LoRA / TT
    adapters, norms, tiny models), where starting a team costs more than the work, most of all on a loaded
    machine."""
    import torch

    return 1 if n < PARALLEL_MIN else torch.get_num_threads()
