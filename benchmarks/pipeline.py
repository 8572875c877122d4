"""Goal: input off the critical path. The whole training loop (Kafka polling, shard decoding,
batch building, steps, publications, checkpoints) runs at >= 0.9x the rate of its steps alone.

Runs the embedded default end to end (`launch.py demo`: a local broker, the generator, two
Ray workers) and reads the final metrics rank 0 reports: `loop_examples_per_s` counts
examples over the whole loop's wall time, `step_examples_per_s` over the time spent inside
train steps only, which is the ceiling any input pipeline can reach. A background thread
per worker polls Kafka and builds batches ahead of the step (bounded by
`train.prefetch_batches`), so the ratio says how much of the input cost is still on the
critical path.

  python benchmarks/pipeline.py [--duration-s 150] [--workers 2] [--run-name bench-pipeline] [-- more launch.py demo args]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration-s", type=float, default=150.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--run-name", default="bench-pipeline")
    p.add_argument("rest", nargs="*", help="more arguments for launch.py demo (after --)")
    args = p.parse_args()
    cmd = [sys.executable, "launch.py", "demo", "--run-name", args.run_name, "--duration-s", str(args.duration_s),
           "--workers", str(args.workers), *args.rest]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"launch.py demo failed with exit status {out.returncode}")
    summary = json.loads((ROOT / "runs" / args.run_name / "summary.json").read_text())
    loop, step = summary["examples_per_s"], summary["step_examples_per_s"]
    print(json.dumps({"loop_examples_per_s": loop, "step_examples_per_s": step, "ratio": round(loop / max(step, 1e-9), 3),
                      "goal_ratio": 0.9, "train_steps": summary["train_steps"], "device": summary["device"],
                      "workers": args.workers, "duration_s": args.duration_s}), flush=True)


if __name__ == "__main__":
    main()
