"""Run every benchmark, each in a fresh interpreter, and report.

    python bench/run.py            # full run (a few minutes)
    python bench/run.py --quick    # reduced sizes, under a minute (CI)
    python bench/run.py --only evaluator,memory

Prints a markdown table (paste it into bench/README.md) and writes the full results,
with every timing behind each median, to bench/results/<UTC time>[-quick].json and
bench/results/latest[-quick].json. Exits 1 if a benchmark failed to run; missed targets
only fail the run with --strict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

BENCHMARKS = ("ingest_http", "inprocess", "native", "otlp", "evaluator", "metrics_scrape", "memory", "stress")


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=common.ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "exporter_modified": bool(git("status", "--porcelain", "--", "exporter"))}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "prometheus_client", "orjson", "uvicorn", "fastapi"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod.replace("_", "-"))
        except Exception:
            out[mod] = "?"
    return out


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json"] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.ROOT)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout:.0f} s", "figures": []}
    for line in proc.stdout.splitlines():
        if line.startswith(common.RESULT_MARK):
            return json.loads(line[len(common.RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"name": name, "error": f"exit {proc.returncode} after {time.perf_counter() - t0:.0f} s: {tail[0][:200]}",
            "figures": [], "stderr": proc.stderr[-5000:]}


def main() -> int:
    p = argparse.ArgumentParser(description="Run the exporter's benchmarks.")
    p.add_argument("--quick", action="store_true", help="reduced sizes for CI (under a minute)")
    p.add_argument("--only", help=f"comma list of benchmarks: {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=HERE / "results", help="directory for the JSON results")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        res = run_one(name, args.quick, 150 if args.quick else 600)
        print(f"  {name}: {res.get('seconds', '-')} s{'  ERROR ' + res['error'] if res.get('error') else ''}",
              file=sys.stderr, flush=True)
        results.append(res)
    total = time.perf_counter() - t0

    doc = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "seconds": round(total, 1),
           "git": git_state(), "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                                           **versions()},
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for path in (args.out / f"{stamp}{suffix}.json", args.out / f"latest{suffix}.json"):
        path.write_text(json.dumps(doc, indent=1) + "\n")

    g = doc["git"]
    print(f"{'Quick' if args.quick else 'Full'} run, {doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}, "
          f"commit {g['commit']}{' with local exporter changes' if g['exporter_modified'] else ''}, "
          f"{total:.0f} s; medians of repeats."
          + (" Reduced sizes (see each label): targets are judged on the full run." if args.quick else "") + "\n")
    print(common.markdown(results))
    judged = [f for r in results for f in r.get("figures", []) if f.get("met") is not None]
    missed = [f for f in judged if not f["met"]]
    print(f"\ntargets met: {len(judged) - len(missed)}/{len(judged)}; results in {args.out / (stamp + suffix + '.json')}")
    if any(r.get("error") for r in results):
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
