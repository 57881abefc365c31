"""Peak resident memory of `lsd sample --model countdown --steps 8 -n N -o F` for several N.

Sampling streams batch by batch, so memory should not depend on N. A full run at N = 10**6 takes
hours on a CPU, so each run is measured up to the same point: once F holds --samples complete
samples (a whole number of batches), the process's peak RSS so far (VmHWM in /proc/PID/status,
Linux only) and its current RSS (VmRSS: the import of torch sets the peak, so growth shows there
first) are read and the process is stopped. Every run therefore does the same work; only N
differs. Usage:

    python benchmarks/sample_memory.py [--n 10000 1000000 100000000] [--samples 256] [--batch-size 64] [--code DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a running process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024, "rss_mib": int(fields["VmRSS"].split()[0]) / 1024}


def measure(n: int, samples: int, batch_size: int, threads: int, code: Path = ROOT) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.jsonl"
        env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "lsdtool.cli", "sample", "--model", "countdown", "--steps", "8", "-n", str(n),
               "--batch-size", str(batch_size), "--format", "jsonl", "-o", str(out)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"lsd exited early: {proc.stderr.read().decode()}")
                lines = out.read_bytes().count(b"\n") if out.exists() else 0
                if lines >= samples:
                    break
                time.sleep(0.2)
            memory = rss_mib(proc.pid)
        finally:
            proc.kill()
            proc.wait()
        return {"n": n, "samples_written": lines, **{k: round(v, 1) for k, v in memory.items()},
                "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10**4, 10**6, 10**8])
    ap.add_argument("--samples", type=int, default=256, help="measure once this many samples are in the file")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the measured process")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose lsdtool is measured (e.g. an older one)")
    args = ap.parse_args()
    print(f"# lsd sample --model countdown --steps 8 -n N -o F --batch-size {args.batch_size}, CPU, "
          f"OMP_NUM_THREADS={args.threads}; peak RSS once {args.samples} samples are written; "
          f"code {args.code}; load average {os.getloadavg()[0]:.2f}")
    for n in args.n:
        print(measure(n, args.samples, args.batch_size, args.threads, args.code), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
