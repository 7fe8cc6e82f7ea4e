#!/usr/bin/env python3
"""The kernel's cost of writing 2 GiB into the page cache, by how long memory sat free.

    benches/write_pace.py [DIR]      (default: a temporary folder beside the benches)

On a virtual machine whose balloon reports free pages to the host (virtio-balloon free
page reporting: /sys/module/page_reporting exists), a page freed a few seconds ago is
handed back to the host, and the next write into it pays the host's fault and zeroing
inside the guest's `write` (system time). A writer that runs right after another file was
deleted gets still-backed pages; one that starts after an idle spell, or paces its writes
(as a clone that computes noise between chunks does), pays the host. This prints the
system time of the same 2 GiB of 8 MiB writes under each condition, so a clone-vs-cp
ratio on such a machine can be read for what it is: no hyperclone code is involved.
"""
import os
import resource
import sys
import tempfile
import time

CHUNK = 8 << 20
CHUNKS = 256  # 2 GiB


def write_file(path, busy_s):
    """Writes CHUNKS chunks, spinning busy_s before each; returns (wall, sys) seconds."""
    buf = bytearray(os.urandom(CHUNK))
    s0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.time()
    with open(path, "wb") as f:
        for _ in range(CHUNKS):
            t = time.time()
            while time.time() - t < busy_s:
                pass
            f.write(buf)
    return time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    reporting = os.path.isdir("/sys/module/page_reporting")
    print(f"free page reporting module present: {reporting}")
    with tempfile.TemporaryDirectory(dir=where) as d:
        path = os.path.join(d, "out.bin")
        # (label, idle seconds before, busy seconds per chunk); each after deleting the last file
        cases = [("warm-up", 0, 0), ("right after a delete", 0, 0),
                 ("after 5 s idle", 5, 0), ("after 20 s idle", 20, 0),
                 ("right after a delete", 0, 0), ("paced, 20 ms per chunk", 0, 0.02),
                 ("right after a delete", 0, 0)]
        print(f"{'condition':<26} {'wall_s':>7} {'sys_s':>7}")
        for label, idle, busy in cases:
            if os.path.exists(path):
                os.remove(path)
            os.sync()
            time.sleep(idle)
            wall, sys_s = write_file(path, busy)
            print(f"{label:<26} {wall:7.2f} {sys_s:7.2f}")
        os.remove(path)


if __name__ == "__main__":
    main()
