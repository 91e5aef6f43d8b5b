"""Write the rule files for VictoriaMetrics' vmalert, prometheus/vmalert/, from prometheus/rules/.

The rule files are written for Prometheus, and every expression and template in them runs
unchanged in vmalert (MetricsQL reads PromQL; vmalert's templates have the same functions).
One field does not: `keep_firing_for`, which vmalert 1.79 (Debian 12's
`victoria-metrics` package) refuses as an unknown field, so it would load no file that has
it. Later vmalert releases read it and can load prometheus/rules/ as it is.

vmalert also keeps the alerts' own state differently: it writes `ALERTS` through remote
write and reads it back from the store an evaluation, a flush and the store's latency
offset later, where Prometheus' next rule of the group reads it at once. The rules do not
depend on that read-back where it matters: an anomaly warning (and the drift and
error-ratio warnings) is held by its critical twin's own condition, not only by the twin's
`ALERTS`, so it does not fire beneath a page that vmalert has not read back yet
(exporter/anomaly/rules.py, detectors.yml, performance.yml).

This script copies every rule file into prometheus/vmalert/ under a header saying where it
came from, without its `keep_firing_for:` lines. Nothing else changes: the same alerts
fire on the same expressions, after the same `for:`. What vmalert 1.79 loses is the
cooldown those lines give (LLMModelLatencyHigh, LLMModelThroughputLow and
LLMErrorRatioHigh: 10 minutes of firing after the condition clears, against flapping;
the anomaly, drift, runaway and invocation alerts: 5 minutes, so a verdict that dips for
a minute alerts once; LLMBackendDown: a minute, so one successful probe does not end a
flickering outage); an alert hovering around its threshold there resolves and fires
again instead, which Alertmanager's group_interval spaces out. (Without the error-ratio
page's cooldown, its warning twin is held only while the page's condition holds or it
fires.)

    python3 prometheus/build_vmalert.py            # rewrite prometheus/vmalert/
    python3 prometheus/build_vmalert.py --check    # exit 1 and list the files that differ

The test suite runs `--check`, so the copies never drift from the rules, and loads every
copy with `vmalert -dryRun`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules"
OUT = HERE / "vmalert"
# rule fields vmalert 1.79 does not know; each is dropped with its line
UNKNOWN_FIELDS = ("keep_firing_for",)
_UNKNOWN = re.compile(r"^\s+(?:%s):.*\n?" % "|".join(UNKNOWN_FIELDS), re.M)

HEADER = """\
# Generated from ../rules/{name} by prometheus/build_vmalert.py for vmalert 1.79, which does
# not know {fields}: do not edit; edit ../rules/{name} and run the script again.
# Differences from the Prometheus file: {differences}.
"""


def convert(name: str, text: str) -> str:
    """The vmalert copy of one rule file's text."""
    dropped = sorted({m.group(0).split(":")[0].strip() for m in _UNKNOWN.finditer(text)})
    differences = ("none" if not dropped else
                   "no " + ", ".join(f"`{f}`" for f in dropped) + " (its cooldown does not apply)")
    fields = " or ".join(f"`{f}`" for f in UNKNOWN_FIELDS)
    return HEADER.format(name=name, fields=fields, differences=differences) + _UNKNOWN.sub("", text)


def expected(rules_dir: Path = RULES) -> dict[str, str]:
    """File name -> text of every file prometheus/vmalert/ should hold."""
    return {p.name: convert(p.name, p.read_text()) for p in sorted(rules_dir.glob("*.yml"))}


def stale(rules_dir: Path = RULES, out_dir: Path = OUT) -> list[str]:
    """Files of out_dir that differ from what the rules generate, are missing or are extra."""
    want = expected(rules_dir)
    have = {p.name: p.read_text() for p in sorted(out_dir.glob("*.yml"))} if out_dir.is_dir() else {}
    return sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))


def write(rules_dir: Path = RULES, out_dir: Path = OUT) -> list[str]:
    """Bring out_dir up to date; returns the names of the files written or removed."""
    changed = stale(rules_dir, out_dir)
    want = expected(rules_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in changed:
        path = out_dir / name
        if name in want:
            path.write_text(want[name])
        else:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    p.add_argument("--rules", type=Path, default=RULES, help="the Prometheus rule files (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT, help="where the vmalert copies go (default: %(default)s)")
    args = p.parse_args(argv)
    if args.check:
        differ = stale(args.rules, args.out)
        for name in differ:
            print(f"{args.out / name}: differs from what {args.rules / name} generates; "
                  "run python3 prometheus/build_vmalert.py", file=sys.stderr)
        return 1 if differ else 0
    for name in write(args.rules, args.out):
        print(f"written: {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
