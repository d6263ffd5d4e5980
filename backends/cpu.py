"""Facts about the CPU that decide backend defaults (read once, cached)."""

from __future__ import annotations

import functools
import platform

__all__ = ["has_vnni"]


@functools.lru_cache(maxsize=None)
def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without int16 saturation).

    Without VNNI, fbgemm's u8 x s8 kernels accumulate pairs in int16 and can saturate, which is why
    fbgemm's activations then use 7 bits (``reduce_range``). With VNNI the full 8 bits are safe.
    """
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni"})
    except OSError:
        return False
    return False
