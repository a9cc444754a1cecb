"""Peak memory of averaging M state dicts: the streaming `uniform_soup` vs stacking them all.

Each route runs in a fresh process that loads M ResNet-50-sized featurizer states one at a time
from loaders (as the reducer does from checkpoints) and reports its peak resident memory above
the baseline. The streaming soup holds one accumulator and the current input; the naive route
(what a `torch.stack(...).mean(0)` implementation does) holds all M.

    python benchmarks/bench_soups.py [--models 10] [--arch resnet50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, torch, timm
from ratatouille.merging.soups import uniform_soup
arch, models, route = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
reference = timm.create_model(arch, num_classes=0).state_dict()
shapes = {k: (v.shape, v.dtype) for k, v in reference.items()}
def load(i):
    g = torch.Generator().manual_seed(i)
    return {k: (torch.randn(s, generator=g).to(d) if d.is_floating_point
                else torch.zeros(s, dtype=d))
            for k, (s, d) in shapes.items()}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if route == "streaming":
    soup = uniform_soup(load(i) for i in range(models))
else:
    states = [load(i) for i in range(models)]
    soup = {k: (torch.stack([s[k] for s in states]).mean(0) if states[0][k].is_floating_point()
                else states[0][k]) for k in states[0]}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (peak - base) / 1024, "seconds": seconds}))
"""


def measure(arch: str, models: int, route: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, arch, str(models), route],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--models", type=int, default=10)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}  averaging {args.models} x {args.arch} featurizer states")
    results = {
        route: measure(args.arch, args.models, route) for route in ("streaming", "stack all")
    }
    for route, r in results.items():
        print(f"  {route:<10} peak +{r['peak_mib']:8.0f} MiB   {r['seconds']:6.2f} s")
    ratio = results["stack all"]["peak_mib"] / max(results["streaming"]["peak_mib"], 1e-9)
    print(f"  memory ratio stack-all / streaming: {ratio:.1f}x")


if __name__ == "__main__":
    main()
