"""How much of each core this machine's host gives: the GEMM the CPU plan uses at this precision
(`cpu_plan.active()`, best of 3 on a 4096 x 3072 x 3072 product, as `profile_step.py` measures it
before each step) with the whole process pinned to one core at a time, then to all of them, round
after round. On a machine of its own a core's rate holds from round to round and all cores give about
the sum of their rates alone; where a VM's host time-slices a core with other guests, the same core
alone jumps between levels from one round to the next (the guest does not see the time it is not
given: its clock runs on). Every step timed on such a machine is timed at a share of the cores it
cannot know.

    python benchmarks/core_share.py [--rounds 8] [--precision auto|fp32|bf16]
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)
from flux1 import cpu_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, gemm_rate  # noqa: E402


def pin(cores: set[int]) -> None:
    """Every thread of this process (the libraries' thread pools included) onto `cores`."""
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), cores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=cpu_plan.PRECISIONS)
    args = parser.parse_args()
    cpu_plan.set_precision(args.precision)
    cores = sorted(os.sched_getaffinity(0))
    path = cpu_plan.active()
    print(f"CPU: {cpu_model()}, cores {cores}; GEMM: {path.name} ({path.library}), GFLOP/s")
    gemm_rate()  # the libraries' threads exist before they are pinned
    alone = {core: [] for core in cores}
    together = []
    print(
        "| round | " + " | ".join(f"core {core} alone" for core in cores) + " | all cores | all / sum alone |"
    )
    print("|---" * (len(cores) + 3) + "|")
    for round_ in range(1, args.rounds + 1):
        for core in cores:
            pin({core})
            alone[core].append(gemm_rate() / 1e9)
        pin(set(cores))
        together.append(gemm_rate() / 1e9)
        cells = [f"{alone[core][-1]:.0f}" for core in cores]
        share = together[-1] / sum(alone[core][-1] for core in cores)
        print(f"| {round_} | " + " | ".join(cells) + f" | {together[-1]:.0f} | {share:.2f} |")
    print()
    for core in cores:
        rates = alone[core]
        print(f"core {core} alone: {min(rates):.0f}-{max(rates):.0f} (median {statistics.median(rates):.0f})")
    print(f"all cores: {min(together):.0f}-{max(together):.0f} (median {statistics.median(together):.0f})")


if __name__ == "__main__":
    main()
