"""Write the alerts' runbook and dashboard links from one setting, prometheus/links.yml.

Like the monitoring mixins' runbook URL pattern and Grafana URL, the two base URLs are set
once; every `runbook_url` and `dashboard_url` annotation, in the rule files and in the
promtool tests' expected annotations, is derived from them:

    runbook_url:   <runbook>#<alert name in lower case>
    dashboard_url: <grafana>/d/<uid>?orgId=1<the alert's label variables, as written>

Only those lines change; everything else in the files is hand-written. The alert name is
the enclosing `- alert:` (rule files) or `alertname:` (test files).

    python3 prometheus/build_links.py            # rewrite the files
    python3 prometheus/build_links.py --check    # exit 1 and list the files that differ

Another generator of rule files (one that writes whole files) can use `runbook_url` and
`dashboard_url` below with the same setting.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SETTING = HERE / "links.yml"
# Files whose links are written here; anomaly.yml and its test are generated as a whole by
# their own generator, with the same setting.
EXCLUDED = frozenset({"anomaly.yml", "anomaly_test.yml", "thresholds.yml", "thresholds_test.yml"})

_ALERT = re.compile(r"^\s*-?\s*(?:alert|alertname):\s*(\w+)\s*$")
_RUNBOOK = re.compile(r"^(\s*runbook_url:\s*)(\S+)\s*$")
_DASHBOARD = re.compile(r"^(\s*dashboard_url:\s*')([^']*?)(/d/[\w-]+\?orgId=1[^']*)('\s*)$")


def links() -> dict[str, str]:
    """The setting: {'runbook': ..., 'grafana': ...}, without trailing slashes."""
    doc = yaml.safe_load(SETTING.read_text())
    return {k: str(doc[k]).rstrip("/") for k in ("runbook", "grafana")}


def runbook_url(alert: str, setting: dict[str, str]) -> str:
    return f"{setting['runbook']}#{alert.lower()}"


def dashboard_url(path: str, setting: dict[str, str]) -> str:
    """`path` is `/d/<uid>?orgId=1...` (with label variables or their template)."""
    return setting["grafana"] + path


def rewrite(text: str, setting: dict[str, str]) -> str:
    """`text` with every runbook_url and dashboard_url line derived from the setting."""
    out, alert = [], None
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        if m := _ALERT.match(body):
            alert = m.group(1)
        elif (m := _RUNBOOK.match(body)) and alert is not None:
            body = m.group(1) + runbook_url(alert, setting)
        elif m := _DASHBOARD.match(body):
            body = m.group(1) + dashboard_url(m.group(3), setting) + m.group(4).rstrip()
        out.append(body + ("\n" if line.endswith("\n") else ""))
    return "".join(out)


def files() -> list[Path]:
    return [p for d in ("rules", "tests") for p in sorted((HERE / d).glob("*.yml")) if p.name not in EXCLUDED]


def stale(paths: Iterable[Path], setting: dict[str, str]) -> list[Path]:
    return [p for p in paths if rewrite(p.read_text(), setting) != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report files whose links differ from the setting")
    args = p.parse_args(argv)
    setting = links()
    differ = stale(files(), setting)
    if args.check:
        for path in differ:
            print(f"{path.relative_to(HERE.parent)}: links differ from prometheus/links.yml", file=sys.stderr)
        return 1 if differ else 0
    for path in differ:
        path.write_text(rewrite(path.read_text(), setting))
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
