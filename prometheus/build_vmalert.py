"""Write the rule files for VictoriaMetrics' vmalert, prometheus/vmalert/, from prometheus/rules/.

The rule files are written for Prometheus, and every expression and template in them runs
unchanged in vmalert (MetricsQL reads PromQL; vmalert's templates have the same functions).
One field does not: `keep_firing_for`, which vmalert 1.79 (Debian 12's
`victoria-metrics` package) refuses as an unknown field, so it would load no file that has
it. Later vmalert releases read it and can load prometheus/rules/ as it is.

The other difference is where an anomaly warning learns that its critical twin fires.
The warning is held back by reading its twin's `ALERTS` series, which Prometheus writes
before the next rule of the group reads it. vmalert writes `ALERTS` through remote write
and reads it back from the store an evaluation, a flush and the store's latency offset
(30 s by default) later. Both twins go pending on the same verdict and fire after the same
`for:`, so on vmalert the warning always fired beneath its page, unseen (Alertmanager
inhibits it), and kept firing through the page (the hold keeps a twin that fired first).
When the page resolved while the verdict decayed through warning, the inhibition lifted
and chat was told of the tail of a cause the pager had already reported. The copies
therefore also hold the warning while its page's own condition holds, read from the
exporter's gauges in the same evaluation as the page, so the hold no longer waits for the
read-back; a twin that did fire first (a verdict at warning for a `for:` before it rose
to critical) still keeps firing, as in Prometheus.

This script copies every rule file into prometheus/vmalert/ under a header saying where it
came from, without its `keep_firing_for:` lines, and with that second hold in the anomaly
warnings. Nothing else changes: the same alerts fire on the same expressions, after the
same `for:`. What vmalert 1.79 loses is the
cooldown those lines give (LLMModelLatencyHigh and LLMModelThroughputLow: 10 minutes of
firing after the condition clears, against flapping; the anomaly, drift, runaway and
invocation alerts: 5 minutes, so a verdict that dips for a minute alerts once;
LLMBackendDown: a minute, so one successful probe does not end a flickering outage); an
alert hovering around its threshold there resolves and fires again instead, which
Alertmanager's group_interval spaces out.

    python3 prometheus/build_vmalert.py            # rewrite prometheus/vmalert/
    python3 prometheus/build_vmalert.py --check    # exit 1 and list the files that differ

The test suite runs `--check`, so the copies never drift from the rules, and loads every
copy with `vmalert -dryRun`.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules"
OUT = HERE / "vmalert"
# rule fields vmalert 1.79 does not know; each is dropped with its line
UNKNOWN_FIELDS = ("keep_firing_for",)
_UNKNOWN = re.compile(r"^\s+(?:%s):.*\n?" % "|".join(UNKNOWN_FIELDS), re.M)
# a warning's hold on its critical twin's ALERTS (exporter/anomaly/rules.py writes it)
_TWIN_HOLD = re.compile(r'max_over_time\(ALERTS\{alertname="(?P<alert>\w+)", alertstate="firing", '
                        r'severity="critical"\}\[\w+\]\)')

HEADER = """\
# Generated from ../rules/{name} by prometheus/build_vmalert.py for vmalert 1.79, which does
# not know {fields}: do not edit; edit ../rules/{name} and run the script again.
# Differences from the Prometheus file: {differences}.
"""


def twin_holds(doc: Any) -> dict[str, tuple[str, str]]:
    """Alert name -> (the warning's hold on its page's `ALERTS`, that hold widened by the
    page's own condition), for every warning of the rule file `doc` that holds on its twin.

    The page's condition is its expression on one line; `or` keeps the label sets of both
    sides, and the hold is matched `on` the series' labels, which both carry."""
    holds: dict[str, tuple[str, str]] = {}
    for group in (doc or {}).get("groups") or []:
        rules = [r for r in group.get("rules") or [] if r.get("alert")]
        pages = {r["alert"]: r["expr"] for r in rules if (r.get("labels") or {}).get("severity") == "critical"}
        for rule in rules:
            name = rule["alert"]
            if (rule.get("labels") or {}).get("severity") != "warning" or name not in pages:
                continue
            m = _TWIN_HOLD.search(rule["expr"])
            if m and m.group("alert") == name:
                page = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", " ".join(pages[name].split())))
                holds[name] = (m.group(0), f"({m.group(0)} or ({page}))")
    return holds


def convert(name: str, text: str) -> str:
    """The vmalert copy of one rule file's text."""
    dropped = sorted({m.group(0).split(":")[0].strip() for m in _UNKNOWN.finditer(text)})
    out = _UNKNOWN.sub("", text)
    holds = twin_holds(yaml.safe_load(text))
    for old, new in holds.values():
        assert out.count(old) == 1, old
        out = out.replace(old, new)
    differences = ["no " + ", ".join(f"`{f}`" for f in dropped) + " (its cooldown does not apply)"] if dropped else []
    if holds:
        differences.append("each anomaly warning is also held while its page's own condition holds "
                           "(vmalert reads `ALERTS` back late)")
    fields = " or ".join(f"`{f}`" for f in UNKNOWN_FIELDS)
    said = HEADER.format(name=name, fields=fields, differences="; ".join(differences) or "none")
    return re.sub(r"^# Differences.*$", lambda m: textwrap.fill(m.group(0), 92, subsequent_indent="# "),
                  said, flags=re.M) + out


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
