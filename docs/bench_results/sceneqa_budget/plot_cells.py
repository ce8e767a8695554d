"""Draw one sceneqa figure from results saved by separate runs (processes run side by side).

    python docs/bench_results/sceneqa_budget/plot_cells.py OUT_DIR RESULT.json [RESULT.json ...]

Every result line of the given files goes into ``infmllm_ros.bench.sceneqa.plot`` as if one run had
made them all; the figure is written as ``OUT_DIR/sceneqa_b<budget>.png``.
"""

import json
import sys

from infmllm_ros.bench.common import BenchConfig
from infmllm_ros.bench.sceneqa import plot


def main(out: str, files: list[str]) -> None:
    results = [line for name in files for line in json.load(open(name))["results"]]
    for path in plot(BenchConfig(out=out), results):
        print(path)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
