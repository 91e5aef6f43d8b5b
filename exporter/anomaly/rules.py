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

from dataclasses import dataclass
from pathlib import Path

import yaml

from .evaluator import SUSTAINED_HOURS
from .signals import SignalSpec

RUNBOOK_URL = "https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md"
DASHBOARD_URL = "http://localhost:3000/d/llm-anomalies"
# How long a verdict must hold before its alert fires. The verdict is already judged on
# count-aware evidence against the weekly false-alarm budget, so `for:` only has to ride
# out a verdict that does not survive the next evaluation (the exporter evaluates every
# 30 s), and a warning needs no longer hold than a page. Every minute of hold is a minute
# added to every alert's delay. On 24 clean weeks of the detection benchmark, 5 minutes ->
# 2 let through 3 more false warning alerts and 2 -> 1 three more (drift warnings that
# the second minute held back), and neither moved a page. One minute became enough once
# an app takes its model's usage verdict from the start (docs/tuning.md, "Alerts hold 1
# minute"): before, a retry storm's model paged before its app's verdict explained it.
FOR = {"warning": "1m", "critical": "1m"}
# How long an alert fires on after its verdict fell below its level (`keep_firing_for`). A
# verdict that hovers at its ratio dips under it for a minute and comes back; without the
# hold the alert resolves, waits out its `for:` again and fires anew, and a notification
# flushed in the gap sends its "resolved" and then the same alert twice. A dip shorter
# than the shortest evaluation window (5 minutes of the hour) is read on data the window
# still held when the alert fired: the same event, as the evaluator already counts it (a
# scope that named an anomaly keeps the name that long, `Evaluator._incumbents`). It is
# also Alertmanager's group_interval, the spacing of a group's notifications. On the
# detection benchmark's anomalies (seed 7) it merged 13 of 87 page firings into the page
# before them (error storms 18 -> 15, empty answers 12 -> 7, latency 3 -> 1; seed 8's
# error storms 16 -> 12) and 37 of the 237 alert firings of either severity (halved
# throughput 33 -> 22, the 2x cost spike 24 -> 17), and moved no delay and no clean week's
# count: an alert's start is where it was, only its end is later.
KEEP_FIRING = {"warning": "5m", "critical": "5m"}
SEVERITY_AT = {"warning": 1, "critical": 2}
# How long a warning twin stays quiet after its critical alert resolved: the longest window
# the verdict judges, the held shift's last 8 whole hours, and the hour in progress. A burst
# that paged stays in that window for this long after the page resolves, and the verdict
# decays through warning as it leaves (first from the configured window, an hour by
# default, then from the held ones); that warning is the tail of the cause the page
# already reported. A new rise of the same alert and scope in that time pages if it is
# severe; only its warning waits.
#
# The twin is also held while its critical alert fires, unless the twin fired first (and so
# was already notified). Alertmanager's inhibition alone is not enough: it mutes what it
# sends, not what the group holds, so a twin firing unseen beneath the page resolves with
# it and its "resolved" rides out in the next notification of its group (another warning
# of the same app), about an alert the receiver never saw. A twin that did fire first keeps
# firing through the page and after it until the verdict falls below warning: had it
# resolved while the page muted it, its "resolved" would be muted too and the receiver
# would hold an alert that never ends.
#
# And the twin is held while its critical alert's own condition holds, read from the
# verdicts as the critical rule reads it, so also while the page is pending. Two reasons.
# A verdict at warning for a minute before it rises to critical would otherwise send the
# warning a minute ahead of its page (the warning's `for:` passes while the page's is still
# running): two notifications for one cause. (A warning that fired a minute or more before
# the page's condition began is the escalation's first word, and keeps firing.) And an
# engine that writes ALERTS through its store and reads it back an evaluation, a flush and
# the store's latency offset later (vmalert on VictoriaMetrics) sees the page's ALERTS only
# after both twins, pending on the same verdict for the same `for:`, have fired: the twin
# would fire beneath every page, unseen, and fire on after it where the verdict decays
# through warning, into the chat channel. The condition needs no read-back. The price: a
# verdict that flickers between warning and critical at every evaluation keeps restarting
# the warning's `for:` as it does the page's.
QUIET_AFTER_PAGE = f"{max(SUSTAINED_HOURS) + 1}h"
PAGE_ENDS = 13          # the generated test's page: severity 2 from minute 5 to 12, then 1 ...
PAGE_DIPS = 9           # ... but for one minute of 1 at minute 9
ESCALATES = (13, 20)    # its escalation: severity 1 from minute 5, 2 from minute 13 to 19, then 1
# the labels that name one alert's series (an HA pair's `replica` is already aggregated away)
_ALERT_SERIES = "job, instance, signal, scope, app, provider, model"
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
#   each fires on for {keep} after the verdict falls below its level (keep_firing_for), so a
#     verdict hovering at its ratio alerts once, not again at every dip;
#   while a critical alert's own condition holds (pending or firing), while it fires and for
#   {quiet_after} after it resolves (the verdict's longest window, a held shift's, which still
#   holds the burst as it decays through warning), its warning twin stays quiet unless the
#   twin fired first: the page is not shadowed by a warning that would resolve unseen into
#   the chat channel, nor preceded by one a minute ahead of it, nor followed by one about
#   the same cause, and a warning that was sent before the page keeps firing until the
#   verdict falls below warning, so its receiver sees it resolve. The critical rule comes
#   first in the group, so the warning reads the critical's state of the same evaluation
#   (and its own of the last); the page's condition is read from the verdicts themselves,
#   so an engine that reads ALERTS back from its store late (vmalert) holds the twin too;
#   an anomaly that a narrower scope explains (llm_anomaly_explained == 1: the global echo
#   of one app's spike, the app echo of one model's slowdown) stays quiet, so one cause
#   pages once. Request rate moves both ways: the sign of llm_anomaly_zscore says which.
# The verdict waits for the baseline's warm-up (min_baseline_hours) by itself.
# The replicas of an exporter (an HA pair: one `instance`, a `replica` label each) judge the
# same records; an alert takes the strongest of them (`max without (replica)`), so it fires
# once, whichever replica is up. docs/scaling.md has the layouts. Each description reads
# its figures from the alert's own exporter (its job and instance), so deployments under
# one Prometheus that name their exporters alike never quote each other's.
"""


def _scope_phrase() -> str:
    return ('{{ if eq $labels.scope "app" }}app {{ $labels.app }}{{ else if eq $labels.scope "model" }}'
            'model {{ $labels.provider }}/{{ $labels.model }}{{ else }}all traffic{{ end }}')


def _gauge(name: str, prefix: str, func: str, suffix: str) -> str:
    return (f'{prefix}{{{{ with printf "{name}{{%s}}" $sel | query }}}}{{{{ . | first | value | {func} }}}}'
            f'{{{{ else }}}}?{{{{ end }}}}{suffix}')


def _condition(spec: SignalSpec, direction: str, severity: str) -> list[str]:
    """The lines of the verdict's own condition for an alert of this severity: the
    strongest replica at the severity's level, in the direction, not explained."""
    sel = f'{{signal="{spec.name}"}}'
    expr = ["max without (replica) (", f"  llm_anomaly_ratio{sel}",
            f"    and llm_anomaly_severity{sel} >= {SEVERITY_AT[severity]}"]
    if spec.direction == "both":
        expr.append(f"    and llm_anomaly_zscore{sel} {'>' if direction == 'up' else '<'} 0")
    return expr + [f"    unless llm_anomaly_explained{sel} == 1", ")"]


def _alert(spec: SignalSpec, direction: str, severity: str, runbook_url: str, dashboard_url: str) -> str:
    assert spec.text is not None
    name, summary = spec.text.alerts[direction]
    expr = _condition(spec, direction, severity)
    if severity == "warning":
        paged = f'ALERTS{{alertname="{name}", alertstate="firing", severity="critical"}}'
        warned = f'ALERTS{{alertname="{name}", alertstate="firing", severity="warning"}}'
        page = " ".join(line.strip() for line in _condition(spec, direction, "critical"))
        page = page.replace("( ", "(").replace(" )", ")")
        expr += [f"  unless on({_ALERT_SERIES})",
                 "    (",
                 f"        (max_over_time({paged}[{QUIET_AFTER_PAGE}])",
                 f"          or {page})",
                 f"      unless on({_ALERT_SERIES}) {warned}",
                 "    )"]
    prefix, func, suffix = spec.text.value
    times = "x its baseline" if direction == "up" else " of its baseline"
    ratio = '{{ $value | printf "%.1f" }}' if direction == "up" else "{{ $value | humanizePercentage }}"
    desc = [
        # (or $labels.x ""): a label the alert lacks is "" in Prometheus' templates but nil in vmalert's
        # the figures are read from the alert's own exporter: its deployment (job) and instance
        '{{ $sel := printf "signal=%q,scope=%q,app=%q,provider=%q,model=%q,job=%q,instance=%q" $labels.signal '
        '$labels.scope (or $labels.app "") (or $labels.provider "") (or $labels.model "") (or $labels.job "") '
        '(or $labels.instance "") -}}',
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
        *([f"        keep_firing_for: {KEEP_FIRING[severity]}"] if severity in KEEP_FIRING else []),
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
    assert KEEP_FIRING["warning"] == KEEP_FIRING["critical"]
    out = [HEADER.format(warning_for=FOR["warning"], critical_for=FOR["critical"], keep=KEEP_FIRING["critical"],
                         quiet_after=QUIET_AFTER_PAGE),
           "groups:\n  - name: llm-anomaly\n    rules:\n"]
    alerts = [_alert(spec, d, sev, runbook_url, dashboard_url)
              for spec in specs for d in spec.directions for sev in ("critical", "warning")]
    out.append("\n".join(alerts))
    return "".join(out)


# --- the promtool test of the generated alerts -------------------------------------------

_SERIES_LABELS = 'instance="exporter:9473",job="llm-usage-exporter"'
# Values that every Go template function in the descriptions renders plainly.
_VALUES = {"up": (5.0, 2.0, 2.5, 6.0), "down": (1.0, 2.0, 0.5, -6.0)}    # current, baseline, ratio, z


def _render(value: float, prefix: str, func: str, suffix: str) -> str:
    """What the alert template prints for one of the plain _VALUES."""
    if func.startswith("printf"):
        text = func.split('"')[1] % value
    elif func == "humanizePercentage":
        text = f"{value * 100:g}%"
    elif func == "humanizeDuration":
        text = f"{value:g}s"
    else:                                   # humanize
        text = f"{value:g}"
    return f"{prefix}{text}{suffix}"


def _expected_description(spec: SignalSpec, direction: str, who: str, current: float, baseline: float,
                          ratio: float, z: float) -> str:
    assert spec.text is not None
    prefix, func, suffix = spec.text.value
    if spec.name == "error_rate":           # a share: keep it below 1 so percentages read plainly
        current, baseline = current / 10, baseline / 10
    shown = f"{ratio:.1f}x its baseline" if direction == "up" else f"{ratio * 100:g}% of its baseline"
    return (f"{spec.text.measure} for {who} is {shown}: {_render(current, prefix, func, suffix)} against a baseline of "
            f"{_render(baseline, prefix, func, suffix)} (evidence z {z:.1f}).")


@dataclass(frozen=True)
class _TestCase:
    """One alert of the generated promtool test, and the alerts it expects."""

    spec: SignalSpec
    direction: str
    name: str
    summary: str
    runbook_url: str
    dashboard_url: str

    def check(self, t: int, *expected: tuple[str, ...]) -> str:
        """One evaluation of this alert at minute t, expecting exactly these alerts, each
        (severity, scope) or (severity, scope, app)."""
        head = f"      - eval_time: {t}m\n        alertname: {self.name}\n        exp_alerts:\n"
        return head + "".join(self.expect(e[0], e[1], e[2] if len(e) > 2 else "chat") for e in expected)

    def expect(self, severity: str, scope: str, app: str = "chat",
               lab: str = 'instance: "exporter:9473", job: llm-usage-exporter',
               values: tuple[float, float, float, float] | None = None) -> str:
        current, baseline, ratio, z = values or _VALUES[self.direction]
        scope_labels = f"app: {app}" if scope == "app" else "provider: openai, model: gpt-4o"
        phrase = f"app {app}" if scope == "app" else "model openai/gpt-4o"
        query = f"var-app={app}" if scope == "app" else "var-provider=openai&var-model=gpt-4o"
        desc = _expected_description(self.spec, self.direction, phrase, current, baseline, ratio, z)
        return (f"          - exp_labels: {{severity: {severity}, category: anomaly, signal: {self.spec.name}, "
                f"scope: {scope}, {scope_labels}, {lab}}}\n"
                "            exp_annotations:\n"
                f"              summary: {self.summary}\n"
                f"              description: \"{desc}\"\n"
                f"              runbook_url: {self.runbook_url}#{self.name.lower()}\n"
                f"              dashboard_url: '{self.dashboard_url}?orgId=1&var-scope={scope}&{query}'\n")


def anomaly_tests(specs: tuple[SignalSpec, ...], runbook_url: str = RUNBOOK_URL,
                  dashboard_url: str = DASHBOARD_URL) -> str:
    """promtool unit tests of the generated alerts, one test per alert: a warning held for
    its `for:`, a critical one with its warning twin, an explained anomaly and (for request
    rate) a move the other way that stay quiet; the annotations of the warning rendered."""
    out = [
        "# promtool unit tests for rules/anomaly.yml, generated with it by `llm-usage-exporter rules`.\n",
        "# Run from the prometheus/ directory: promtool test rules tests/anomaly_test.yml\n",
        "#\n",
        "# Per alert, on a one-minute grid, from minute 5 on:\n",
        f"#   app=chat           severity 1 until minute {PAGE_ENDS}, 0 at minute {PAGE_DIPS} -> warning once held for its for:,\n",
        f"#                      firing on through the dip and for {KEEP_FIRING['warning']} past minute {PAGE_ENDS} (keep_firing_for)\n",
        "#   model=openai/gpt-4o severity 2 (high), on two replicas   -> critical; its warning twin held\n",
        "#   app=echo           severity 2 and explained              -> silent\n",
        "#   app=quiet          severity 0                            -> silent\n",
        "#   app=other-way      (request rate) severity 1, the other direction -> silent for this alert\n",
        f"#   app=after-page     severity 2 until minute {PAGE_ENDS}, then 1          -> critical, its twin held;\n",
        f"#                      through a minute of 1 at minute {PAGE_DIPS} it fires on (keep_firing_for), and\n",
        f"#                      {KEEP_FIRING['critical']} past minute {PAGE_ENDS} it resolves; then nothing for {QUIET_AFTER_PAGE}, then the warning\n",
        f"#   app=escalates      severity 1, 2 from minute {ESCALATES[0]} to {ESCALATES[1] - 1}, then 1 -> the warning,\n",
        "#                      then the critical too; the warning fires on through the page and after it\n",
        "#   app=rises          severity 1 for one minute, then 2    -> critical only: its warning, pending\n",
        "#                      as the page's condition begins, is held by that condition, not sent a\n",
        "#                      minute before the page\n",
        "#   (the model's page fires throughout)\n",
        "rule_files:\n  - ../rules/anomaly.yml\nevaluation_interval: 1m\ngroup_eval_order:\n  - llm-anomaly\ntests:\n",
    ]
    warn_for = int(FOR["warning"].rstrip("m"))
    crit_for = int(FOR["critical"].rstrip("m"))
    eval_min = 5 + max(warn_for, crit_for) + 1
    assert eval_min < PAGE_DIPS < PAGE_DIPS + 1 < PAGE_ENDS < ESCALATES[0] + crit_for < ESCALATES[1]
    assert 5 + warn_for < ESCALATES[0]
    quiet = _minutes(QUIET_AFTER_PAGE)
    keep = _minutes(KEEP_FIRING["critical"])
    again = PAGE_ENDS - 1 + keep + quiet + warn_for + 2     # the critical's last firing minute + the hold + the warning's for:
    steps = again + 2

    def firing(t: int) -> list[tuple[str, ...]]:
        """The alerts firing at minute t (from eval_min on), each (severity, scope[, app])."""
        out = [("critical", "model"), ("warning", "app", "escalates")]
        if t < PAGE_ENDS + keep:
            out += [("warning", "app"), ("critical", "app", "after-page")]
        if ESCALATES[0] + crit_for <= t < ESCALATES[1] + keep:
            out.append(("critical", "app", "escalates"))
        if t >= again:
            out.append(("warning", "app", "after-page"))
        if t >= 6 + crit_for:
            out.append(("critical", "app", "rises"))
        return out

    for spec in specs:
        for direction in spec.directions:
            assert spec.text is not None
            name, summary = spec.text.alerts[direction]
            current, baseline, ratio, z = _VALUES[direction]
            cases = {("app", "chat"): (-3, 0, z), ("model", "gpt-4o"): (2, 0, z), ("app", "echo"): (2, 1, z),
                     ("app", "quiet"): (0, 0, z), ("app", "after-page"): (-1, 0, z), ("app", "escalates"): (-2, 0, z),
                     ("app", "rises"): (-4, 0, z)}
            if spec.direction == "both":
                cases[("app", "other-way")] = (1, 0, -z)
            out.append(f"  - name: '{name} ({direction})'\n    interval: 1m\n    input_series:\n")
            for (scope, who), (sev, explained, zz) in cases.items():
                base_labels = (f'signal="{spec.name}",scope="{scope}",' +
                               (f'app="{who}"' if scope == "app" else f'provider="openai",model="{who}"') + "," +
                               _SERIES_LABELS)
                # the model's verdict comes from an HA pair: both replicas publish it
                for labels in ([f'{base_labels},replica="a"', f'{base_labels},replica="b"'] if scope == "model"
                               else [base_labels]):
                    cur, base = (current / 10, baseline / 10) if spec.name == "error_rate" else (current, baseline)
                    for metric, value in (("ratio", ratio), ("current", cur), ("baseline", base), ("zscore", zz),
                                          ("explained", explained)):
                        out.append(f"      - series: 'llm_anomaly_{metric}{{{labels}}}'\n"
                                   f"        values: '{_num(value)}x{steps}'\n")
                    if sev == -1:           # a page (with a dip), then its tail
                        values = f"0x4 2x{PAGE_DIPS - 6} 1 2x{PAGE_ENDS - PAGE_DIPS - 2} 1x{steps - PAGE_ENDS}"
                    elif sev == -3:         # a warning (with a dip) that ends with the page
                        values = f"0x4 1x{PAGE_DIPS - 6} 0 1x{PAGE_ENDS - PAGE_DIPS - 2} 0x{steps - PAGE_ENDS}"
                    elif sev == -4:         # a minute at warning, then a page
                        values = f"0x4 1 2x{steps - 6}"
                    elif sev == -2:         # a warning, then a page, then the warning's level again
                        up, down = ESCALATES
                        values = f"0x4 1x{up - 6} 2x{down - up - 1} 1x{steps - down}"
                    else:
                        values = f"0x4 {sev}x{steps - 4}"
                    out.append(f"      - series: 'llm_anomaly_severity{{{labels}}}'\n        values: '{values}'\n")
            out.append("    alert_rule_test:\n")
            ctx = _TestCase(spec, direction, name, summary, runbook_url, dashboard_url)
            # the verdicts are pending: nothing yet
            out.append(f"      - eval_time: {4 + min(warn_for, crit_for)}m\n        alertname: {name}\n        exp_alerts: []\n")
            # just before the warning's for: has passed: only the critical one (its for: is shorter)
            early = 4 + warn_for
            out.append(f"      - eval_time: {early}m\n        alertname: {name}\n")
            out.append("        exp_alerts:\n" + ctx.expect("critical", "model") + ctx.expect("critical", "app", "after-page")
                       if crit_for < warn_for else "        exp_alerts: []\n")
            # the warnings a minute at their level fire, but not the one whose page's condition
            # began meanwhile (app=rises, still pending); then the pages fire without their twins
            out.append(ctx.check(5 + warn_for, *firing(5 + warn_for)))
            out.append(ctx.check(eval_min, *firing(eval_min)))
            # the first page and app=chat's warning fire on through their verdicts' dips, and at
            # once as the verdicts are back (no new `for:`): one alert each, not two
            for t in (PAGE_DIPS, PAGE_DIPS + 1):
                out.append(ctx.check(t, *firing(t)))
            # the escalation pages, and its warning fires on beneath the page
            out.append(ctx.check(ESCALATES[0] + crit_for, *firing(ESCALATES[0] + crit_for)))
            # the first page and app=chat's warning fire on for their keep_firing_for after their
            # verdicts fell, then resolve, and the page's twin stays quiet (the last check is just before the hold
            # plus the warning's for: have passed); the escalation's page resolved likewise and
            # its warning, sent before the page, fires on until the verdict falls below warning ...
            for t in (PAGE_ENDS, PAGE_ENDS + keep - 1, PAGE_ENDS + keep, ESCALATES[1] + keep,
                      PAGE_ENDS + keep + quiet + warn_for - 1):
                out.append(ctx.check(t, *firing(t)))
            # ... and then a warning that is still there is sent
            out.append(ctx.check(again, *firing(again)))
    out.append(_two_deployments_test(specs, runbook_url, dashboard_url, eval_min, steps))
    return "".join(out)


# Two deployments that both name their exporter as docs/scaling.md's HA layout does; only
# `job` tells them apart. Their figures differ, so a description reading the other's shows.
_DEPLOYMENTS = {"prod": (5.0, 2.0, 2.5, 6.0), "staging": (3.0, 1.5, 2.0, 4.0)}  # current, baseline, ratio, z


def _two_deployments_test(specs: tuple[SignalSpec, ...], runbook_url: str, dashboard_url: str,
                          eval_min: int, steps: int) -> str:
    """One test of the first alert on a rise: two deployments (jobs) whose exporters share
    an instance name see the same app rise, each by its own figures; each alert's
    description must quote its own deployment's current value, baseline and z."""
    spec = next(s for s in specs if "up" in s.directions)
    assert spec.text is not None
    name, summary = spec.text.alerts["up"]
    out = [f"  - name: '{name} (two deployments with the same instance name quote their own figures)'\n"
           "    interval: 1m\n    input_series:\n"]
    for job, (current, baseline, ratio, z) in _DEPLOYMENTS.items():
        labels = f'signal="{spec.name}",scope="app",app="chat",instance="exporter",job="{job}"'
        cur, base = (current / 10, baseline / 10) if spec.name == "error_rate" else (current, baseline)
        for metric, value in (("ratio", ratio), ("current", cur), ("baseline", base), ("zscore", z), ("explained", 0)):
            out.append(f"      - series: 'llm_anomaly_{metric}{{{labels}}}'\n        values: '{_num(value)}x{steps}'\n")
        out.append(f"      - series: 'llm_anomaly_severity{{{labels}}}'\n        values: '0x4 1x{steps - 4}'\n")
    out.append(f"    alert_rule_test:\n      - eval_time: {eval_min}m\n        alertname: {name}\n        exp_alerts:\n")
    ctx = _TestCase(spec, "up", name, summary, runbook_url, dashboard_url)
    for job, values in _DEPLOYMENTS.items():
        out.append(ctx.expect("warning", "app", lab=f"instance: exporter, job: {job}", values=values))
    return "".join(out)


def _minutes(duration: str) -> int:
    """Whole minutes of a Prometheus duration of minutes or hours ("5m", "1h")."""
    value, unit = int(duration[:-1]), duration[-1]
    if unit not in "mh":
        raise ValueError(f"cannot read the duration {duration!r}: minutes or hours only")
    return value * (60 if unit == "h" else 1)


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


def link_setting(prometheus_dir: Path) -> tuple[str, str]:
    """(runbook URL, anomaly dashboard URL) from prometheus/links.yml, the one setting every
    alert's links come from (the shipped defaults where the file is missing)."""
    path = prometheus_dir / "links.yml"
    if not path.is_file():
        return RUNBOOK_URL, DASHBOARD_URL
    doc = yaml.safe_load(path.read_text()) or {}
    grafana = str(doc.get("grafana", DASHBOARD_URL.rsplit("/d/", 1)[0])).rstrip("/")
    return str(doc.get("runbook", RUNBOOK_URL)).rstrip("/"), f"{grafana}/d/llm-anomalies"


def generate(rules_dir: Path, specs: tuple[SignalSpec, ...], check: bool = False,
             runbook_url: str | None = None, dashboard_url: str | None = None) -> list[Path]:
    """Write (or with `check`, compare) anomaly.yml and thresholds.yml in `rules_dir` and the
    alerts' promtool test in `rules_dir/../tests`; returns the files that differ from what
    the specs generate. Links come from `rules_dir/../links.yml` unless given."""
    runbook_default, dashboard_default = link_setting(rules_dir.parent)
    runbook_url = runbook_url or runbook_default
    dashboard_url = dashboard_url or dashboard_default
    stale = []
    for path in (rules_dir / "anomaly.yml", rules_dir.parent / "tests" / "anomaly_test.yml", rules_dir / "thresholds.yml"):
        old = path.read_text() if path.exists() else ""
        if path.name == "anomaly.yml":
            new = anomaly_rules(specs, runbook_url, dashboard_url)
        elif path.name == "anomaly_test.yml":
            new = anomaly_tests(specs, runbook_url, dashboard_url)
        else:
            new = splice_thresholds(old, threshold_block(specs))
        if new != old:
            stale.append(path)
            if not check:
                path.write_text(new)
    return stale
