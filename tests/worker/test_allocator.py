"""The worker's allocator setting (``SAM2UNET_MMAP_THRESHOLD_MB``): blocks from the threshold up
get mappings of their own, also after a large block was freed (glibc's default would then serve
them from the heap), and a freed block's mapping goes back to the system whole.

Each case runs in a fresh interpreter (the allocator's state is per process) and reads the
process's anonymous mappings from /proc/self/maps around raw ``malloc``/``free`` calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")

PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from worker.runtime import set_mmap_threshold

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mappings():
        out = set()
        for line in open("/proc/self/maps"):
            parts = line.split()
            if len(parts) == 5:  # anonymous: no path
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.add((lo, hi))
        return out

    def own_mapping(size):
        # (pointer, whether the block got a mapping of its own)
        before = mappings()
        p = libc.malloc(size)
        new = mappings() - before
        return p, any(hi - lo >= size and lo <= p < hi for lo, hi in new)

    threshold = int(sys.argv[1])
    set_ok = set_mmap_threshold(threshold)
    mib = 2**20
    first, first_own = own_mapping(20 * mib)
    before_free = mappings()
    libc.free(first)
    returned = len(before_free - mappings()) > 0
    second, second_own = own_mapping(20 * mib)  # after a large free
    small, small_own = own_mapping(8 * mib)
    print(json.dumps({"set": set_ok, "first_own": first_own, "returned": returned,
                      "second_own": second_own, "small_own": small_own}))
    """
)


def probe(threshold_mb: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold_mb)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_blocks_from_the_threshold_up_get_their_own_mapping_also_after_a_large_free():
    got = probe(16)
    assert got["set"]
    assert got["first_own"] and got["returned"], got  # freed: the mapping goes back whole
    assert got["second_own"], got
    assert not got["small_own"], got  # below the threshold: the heap


def test_glibc_default_serves_a_large_block_from_the_heap_after_a_large_free():
    """What the setting changes: with glibc's sliding threshold, freeing a 20 MiB block raises
    the threshold, and the next 20 MiB block comes from the heap."""
    got = probe(0)
    assert not got["set"]
    assert not got["second_own"], got
