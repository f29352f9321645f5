"""The labeler's allocator setting: a large buffer freed by one image is reused by the next
without faulting fresh pages in (engine.runtime.allocator)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from engine.runtime.allocator import keep_freed_buffers
tuned = keep_freed_buffers() if sys.argv[1] == "tuned" else None
def image(i):
    a = np.ones((1500, 2250, 4), np.uint8)   # PIL's buffer
    b = np.ones((1500, 2250, 3), np.uint8)   # the RGB array
    c = np.ones((1500, 2250), np.float32)    # a map
    return int(a[0,0,0]+b[0,0,0]+c[0,0])
faults = []
with ThreadPoolExecutor(2) as pool:
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        list(pool.map(image, range(4)))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_photo_buffer_is_reused_without_new_page_faults():
    """Four SA-1B-sized images' buffers (PIL's RGBX, the RGB array, a float map) on two codec
    threads, round after round, as a labeler's decode and encode make them."""
    pages = 1500 * 2250 * 3 // 4096      # one RGB array's pages
    plain, tuned = _faults("plain"), _faults("tuned")
    assert tuned["tuned"] is True
    assert sum(plain["faults"][1:]) > 2 * pages      # glibc's default: the rounds fault pages in again
    assert max(tuned["faults"][1:]) < pages // 20     # tuned: the last round's pages, reused
