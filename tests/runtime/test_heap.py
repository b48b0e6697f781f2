"""pyro_lmscm.runtime.heap: glibc's heap kept for reuse inside a scope, given back on exit."""

import pytest

from pyro_lmscm.runtime import heap

_HEAP_PROBE = """
import json, resource, torch
from pyro_lmscm.runtime import heap_allocations, release_freed_memory

def faults(repeats=12):  # minor page faults of each allocation of a 64 MiB tensor, written then freed
    out = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(16 * 2**20).fill_(1.0)
        del block
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

def resident():  # MiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 2**20

outside = faults()
base = resident()
with heap_allocations():
    inside = faults()
    with heap_allocations():
        pass
    nested = faults()
    blocks = [torch.empty(16 * 2**20).fill_(1.0) for _ in range(4)]
    del blocks
    release_freed_memory()  # (a trim inside the scope: the scope keeps the memory)
    kept = resident() - base
print(json.dumps([outside, inside, nested, kept, resident() - base]))
"""


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="glibc's allocator")
def test_heap_allocations_reuse_freed_memory_inside_the_scope_and_give_it_back_on_exit():
    """In a fresh process (whose heap no earlier test has grown): a 64 MiB tensor is 16,384
    pages. Outside the scope (the baseline) glibc maps each allocation afresh, so every one
    faults in all its pages; inside, the blocks come from the heap and a freed one is reused:
    after the first few (measured: one to three, while the heap grows), none faults, also after
    a nested scope's exit. Inside,
    256 MiB freed stays resident (kept for reuse, also through ``release_freed_memory``); the
    outermost exit gives it back."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True)
    outside, inside, nested, kept, after = json.loads(out.stdout)
    pages = 16 * 2**20 * 4 // 4096
    assert all(f > pages // 2 for f in outside)
    assert all(f < pages // 100 for f in inside[4:]) and all(f < pages // 100 for f in nested)
    assert kept > 200 and after < 50


def test_heap_allocations_without_glibc_do_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.heap_allocations():
        assert heap._HEAP_SCOPES == [0]
    assert heap.release_freed_memory() is None
