"""Prometheus rules generated from the signal specs: the anomaly alerts and their thresholds.

The exporter judges every anomaly itself (`evaluator.py`) and publishes the verdict as
`llm_anomaly_severity`; the alerts route that verdict. So the anomaly rules carry no
numbers of their own: each alert fires on the severity, for the direction its signal
moved in, unless `llm_anomaly_explained` says a narrower scope's alert covers the same
cause. The thresholds the exporter judged with are published as recording rules in
`thresholds.yml` (between the generated-block markers) so dashboards draw the same lines.

`llm-usage-exporter rules` writes both files from the specs in effect (defaults plus the
configuration's `signals:`); `--check` fails when the files on disk differ, which is what
the test suite runs against the shipped defaults.
"""

from __future__ import annotations

from pathlib import Path

from .signals import SignalSpec

RUNBOOK_URL = "https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md"
DASHBOARD_URL = "http://localhost:3000/d/llm-anomalies"
FOR = {"warning": "5m", "critical": "2m"}
SEVERITY_AT = {"warning": 1, "critical": 2}
BEGIN = "      # --- anomaly signals: generated from the signal specs by `llm-usage-exporter rules`; do not edit ---\n"
END = "      # --- end of the generated anomaly thresholds ---\n"

HEADER = """\
# Anomaly alerts on the exporter's verdicts (llm_anomaly_severity), generated from the
# signal specs (exporter/signals.py) by `llm-usage-exporter rules`: do not edit; change
# the specs or the exporter's `signals:` configuration and generate again.
#
# The exporter judges each signal and scope on event time: an effect big enough (the
# signal's ratio, see thresholds.yml) and count-aware evidence that it is real
# (docs/tuning.md). These rules route the verdict:
#   warning  fires at llm_anomaly_severity >= 1 held for {warning_for},
#   critical fires at llm_anomaly_severity == 2 held for {critical_for}, and inhibits its warning twin;
#   an anomaly that a narrower scope explains (llm_anomaly_explained == 1: the global echo
#   of one app's spike, the app echo of one model's slowdown) stays quiet, so one cause
#   pages once. Request rate moves both ways: the sign of llm_anomaly_zscore says which.
# The verdict waits for the baseline's warm-up (min_baseline_hours) by itself.
"""


def _scope_phrase() -> str:
    return ('{{ if eq $labels.scope "app" }}app {{ $labels.app }}{{ else if eq $labels.scope "model" }}'
            'model {{ $labels.provider }}/{{ $labels.model }}{{ else }}all traffic{{ end }}')


def _gauge(name: str, prefix: str, func: str, suffix: str) -> str:
    return (f'{prefix}{{{{ with printf "{name}{{%s}}" $sel | query }}}}{{{{ . | first | value | {func} }}}}'
            f'{{{{ else }}}}?{{{{ end }}}}{suffix}')


def _alert(spec: SignalSpec, direction: str, severity: str, runbook_url: str, dashboard_url: str) -> str:
    assert spec.text is not None
    name, summary = spec.text.alerts[direction]
    sel = f'{{signal="{spec.name}"}}'
    expr = [f"llm_anomaly_ratio{sel}", f"  and llm_anomaly_severity{sel} >= {SEVERITY_AT[severity]}"]
    if spec.direction == "both":
        expr.append(f"  and llm_anomaly_zscore{sel} {'>' if direction == 'up' else '<'} 0")
    expr.append(f"  unless llm_anomaly_explained{sel} == 1")
    prefix, func, suffix = spec.text.value
    times = "x its baseline" if direction == "up" else " of its baseline"
    ratio = '{{ $value | printf "%.1f" }}' if direction == "up" else "{{ $value | humanizePercentage }}"
    desc = [
        '{{ $sel := printf "signal=%q,scope=%q,app=%q,provider=%q,model=%q,instance=%q" $labels.signal '
        '$labels.scope $labels.app $labels.provider $labels.model $labels.instance -}}',
        f"{spec.text.measure} for",
        _scope_phrase(),
        f"is {ratio}{times}: {_gauge('llm_anomaly_current', prefix, func, suffix)} against a baseline of",
        f"{_gauge('llm_anomaly_baseline', prefix, func, suffix)} (evidence z "
        + '{{ with printf "llm_anomaly_zscore{%s}" $sel | query }}{{ . | first | value | printf "%.1f" }}'
          '{{ else }}?{{ end }}).',
    ]
    dash = (f"'{dashboard_url}?orgId=1&var-scope={{{{ $labels.scope }}}}"
            "{{ with $labels.app }}&var-app={{ . | urlquery }}{{ end }}"
            "{{ with $labels.provider }}&var-provider={{ . | urlquery }}{{ end }}"
            "{{ with $labels.model }}&var-model={{ . | urlquery }}{{ end }}'")
    lines = [
        f"      - alert: {name}",
        "        expr: |",
        *[f"          {e}" for e in expr],
        f"        for: {FOR[severity]}",
        "        labels:",
        f"          severity: {severity}",
        "          category: anomaly",
        "        annotations:",
        f"          summary: {summary}",
        "          description: >-",
        *[f"            {d}" for d in desc],
        f"          runbook_url: {runbook_url}#{name.lower()}",
        f"          dashboard_url: {dash}",
    ]
    return "\n".join(lines) + "\n"


def anomaly_rules(specs: tuple[SignalSpec, ...], runbook_url: str = RUNBOOK_URL,
                  dashboard_url: str = DASHBOARD_URL) -> str:
    """The text of prometheus/rules/anomaly.yml."""
    out = [HEADER.format(warning_for=FOR["warning"], critical_for=FOR["critical"]),
           "groups:\n  - name: llm-anomaly\n    rules:\n"]
    alerts = [_alert(spec, d, sev, runbook_url, dashboard_url)
              for spec in specs for d in spec.directions for sev in ("warning", "critical")]
    out.append("\n".join(alerts))
    return "".join(out)


def _num(x: float) -> str:
    return f"{x:g}"


def threshold_block(specs: tuple[SignalSpec, ...]) -> str:
    """The generated part of prometheus/rules/thresholds.yml: the numbers each anomaly
    verdict was judged with, as constant recording rules, for dashboards and humans."""
    lines = [
        BEGIN,
        "      # ratio: the effect an alert needs, as a multiple of the baseline (severity warning /\n"
        "      # critical = the exporter's warning / high); ratio_low: the level a drop must reach.\n",
    ]

    def rule(record: str, value: float, **labels: str) -> None:
        lab = ", ".join(f"{k}: {v}" for k, v in labels.items())
        lines.append(f'      - {{record: "{record}", expr: "vector({_num(value)})", labels: {{{lab}}}}}\n')

    for s in specs:
        for sev, up in (("warning", s.warning_ratio), ("critical", s.high_ratio)):
            if "up" in s.directions:
                rule("llm:anomaly_threshold:ratio", up, signal=s.name, severity=sev)
        for sev, ratio in (("warning", s.warning_ratio), ("critical", s.high_ratio)):
            if "down" in s.directions:
                drop = (s.drop_warning_ratio if sev == "warning" else s.drop_high_ratio) if s.direction == "both" else ratio
                rule("llm:anomaly_threshold:ratio_low", round(1.0 / drop, 6), signal=s.name, severity=sev)
    lines.append("      # sustained_ratio: a smaller change that warns when held for 2 to 8 hours (0: none)\n")
    for s in specs:
        rule("llm:anomaly_threshold:sustained_ratio", s.sustained_ratio, signal=s.name)
    lines.append("      # min_current: the smallest value a verdict needs, in the signal's unit (for drops: the baseline)\n")
    for s in specs:
        rule("llm:anomaly_threshold:min_current", s.min_current, signal=s.name)
    lines.append("      # min_baseline_hours: history needed before the first verdict\n")
    for s in specs:
        rule("llm:anomaly_threshold:min_baseline_hours", s.min_baseline_hours, signal=s.name)
    lines.append(END)
    return "".join(lines)


def splice_thresholds(text: str, block: str) -> str:
    """thresholds.yml with its generated block replaced."""
    try:
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
    except ValueError:
        raise ValueError("thresholds.yml: the generated-block markers are missing; restore them from the shipped file") from None
    return text[:a] + block + text[b:]


def generate(rules_dir: Path, specs: tuple[SignalSpec, ...], check: bool = False,
             runbook_url: str = RUNBOOK_URL, dashboard_url: str = DASHBOARD_URL) -> list[Path]:
    """Write (or with `check`, compare) anomaly.yml and thresholds.yml in `rules_dir`;
    returns the files that differ from what the specs generate."""
    targets = {
        rules_dir / "anomaly.yml": lambda _old: anomaly_rules(specs, runbook_url, dashboard_url),
        rules_dir / "thresholds.yml": lambda old: splice_thresholds(old, threshold_block(specs)),
    }
    stale = []
    for path, make in targets.items():
        old = path.read_text() if path.exists() else ""
        new = make(old)
        if new != old:
            stale.append(path)
            if not check:
                path.write_text(new)
    return stale
