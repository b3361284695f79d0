"""How fast `clipadapt --help` and an argument error return, against importing torch.

Before this was measured, every command module imported torch (and the package read its
version through importlib.metadata) while the parser was built, so `--help` cost at least a
torch import. The baseline here is that: a fresh interpreter that imports torch and open_clip
and builds the same parser. Each case runs in fresh interpreters (median of --repeat runs, in
the same process), and the modules `python -X importtime` lists are checked for torch.

    python benchmarks/cli_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "clipadapt --help": "from clipadapt.cli import main\ntry:\n    main(['--help'])\n"
    "except SystemExit:\n    pass\n",
    "clipadapt bench (unknown dataset)": "from clipadapt.cli import main\n"
    "main(['bench', '--methods', 'zero-shot', '--data', 'no-such-dataset', '--out', 'o'])\n",
}
BASELINE = "import torch, open_clip\nfrom clipadapt.cli import build_parser\nbuild_parser()\n"


def wall(code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def imports_torch(code: str) -> bool:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    )
    return any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    empty = wall("pass", args.repeat)
    base = wall(BASELINE, args.repeat)
    print(
        f"python start-up alone: {empty:.3f} s; baseline (torch + open_clip + parser): {base:.3f} s"
    )
    for name, code in CASES.items():
        t = wall(code, args.repeat)
        print(
            f"{name}: {t:.3f} s, {t / base:.2f}x the baseline "
            f"(torch imported: {imports_torch(code)})"
        )


if __name__ == "__main__":
    main()
