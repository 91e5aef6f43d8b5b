"""The command line: serve, replay, backtest and demo.

Flags are generated from `config.Settings`, so every knob has a flag (except secrets,
which come from a file or the environment only), an environment variable and a line in
`--help`. Errors are caught here and printed as one clear line with exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import orjson

from . import __version__
from .config import ConfigError, Settings, knobs, load_settings, parse_duration
from .ingest.prices import PriceError
from .storage.store import StoreError

log = logging.getLogger("llm_usage_exporter")
DEMO_CONNECT_RETRIES = 8     # backoff 0.5 s doubling: about two minutes before the demo gives up


def _knob_help() -> str:
    lines = ["every knob (flag / environment variable / YAML key), lowest precedence first:",
             "defaults < --config YAML < environment < flags; a section's knobs follow it (YAML: section: {knob: value})"]
    for k in knobs():
        if not k.scalar:
            flag, env = "(YAML only)", "-"          # mappings and sections have no flag and no variable
        else:
            flag, env = k.flag or "(env/file only)", k.env or "-"
        name = k.name if len(k.path) == 1 else "  " + k.name
        lines.append(f"  {name:<32} {flag:<38} {env:<44} default {k.show(k.default)}: {k.description}")
    return "\n".join(lines)


def _add_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (also LLM_EXPORTER_<NAME> or the YAML file)")
    g.add_argument("--config", help="YAML file of settings (env LLM_EXPORTER_CONFIG)")
    for k in knobs():
        if k.flag is None:
            continue
        about = k.description.replace("%", "%%")         # argparse formats help with %
        if k.annotation is bool:
            g.add_argument(k.flag, dest=k.dest, action="store_const", const=True, default=None,
                           help=f"{about} [{k.env}]")
        elif k.name == "tail":
            g.add_argument(k.flag, dest=k.dest, action="append", default=None, metavar="PATH",
                           help=f"{about} [{k.env}]")
        else:
            g.add_argument(k.flag, dest=k.dest, default=None, metavar=k.path[-1].upper(),
                           help=f"{about} [{k.env}; default {k.show(k.default).replace('%', '%%')}]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-usage-exporter",
        description="Turns LLM usage records into Prometheus metrics and rolling-baseline anomaly signals.",
        epilog=_knob_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"llm-usage-exporter {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the HTTP API and /metrics", epilog=_knob_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_knobs(s)

    r = sub.add_parser("replay", help="load JSONL/CSV history into the store, on its original timestamps")
    r.add_argument("files", nargs="+", metavar="FILE")
    _add_knobs(r)

    b = sub.add_parser("backtest", help="replay history on event time and print when each signal would have fired")
    b.add_argument("files", nargs="+", metavar="FILE")
    b.add_argument("--from", dest="start", help="first evaluation time (RFC 3339 or epoch; default: first record)")
    b.add_argument("--to", dest="end", help="last evaluation time (default: last record + window)")
    b.add_argument("--step", default="5m", help="time between evaluations (default 5m)")
    b.add_argument("--format", choices=("table", "json", "csv"), default=None, help="default: table on a terminal, json otherwise")
    _add_knobs(b)

    u = sub.add_parser("tune", help="backtest a history and propose anomaly thresholds that meet a false-alert target")
    u.add_argument("files", nargs="+", metavar="FILE", help="JSONL/CSV history of ordinary traffic (cut known incidents out)")
    u.add_argument("--target", type=float, default=1.0, help="false alerts a week allowed over all anomaly signals (default 1)")
    u.add_argument("--step", default="5m", help="time between evaluations of the backtest (default 5m)")
    u.add_argument("--lower", action="store_true", help="also propose ratios below the ones in effect (default: only raise)")
    u.add_argument("--write", metavar="PATH", help="write the thresholds file here (else print it)")
    _add_knobs(u)

    g = sub.add_parser("rules", help="write the anomaly alert rules and thresholds from the signal specs in effect")
    g.add_argument("--out", default="prometheus/rules", help="rules directory holding anomaly.yml and thresholds.yml")
    g.add_argument("--check", action="store_true", help="change nothing; exit 1 when the files differ from the specs")
    _add_knobs(g)

    h = sub.add_parser("shard", help="print the shard that owns each app, for exporters sharded by app (docs/scaling.md)")
    h.add_argument("apps", nargs="+", metavar="APP")
    h.add_argument("--shards", type=int, required=True, help="how many shards the apps are spread over")

    d = sub.add_parser("demo", help="send demo traffic (a week of history, then live with anomalies) to an exporter")
    d.add_argument("--target", default="http://127.0.0.1:9473", help="exporter base URL")
    d.add_argument("--days", type=float, default=7.0, help="days of history to backfill first")
    d.add_argument("--token-file", help="file holding a bearer token for the exporter")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    flags = {k.dest: getattr(args, k.dest) for k in knobs() if getattr(args, k.dest, None) is not None}
    return load_settings(getattr(args, "config", None), flags)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "shard":
            return _shard(args)
        settings = _settings(args)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
        return {"serve": _serve, "replay": _replay, "backtest": _backtest, "rules": _rules,
                "tune": _tune}[args.command](settings, args)
    except (ConfigError, PriceError, StoreError) as e:
        print(f"llm-usage-exporter: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.check_binding()
    import uvicorn

    from .engine import Engine
    from .sources.tail import TailFollower
    from .web.app import create_app
    from .web.connections import connection_limits, raise_fd_limit, serve_options

    engine = Engine(settings)
    tasks = [("tail", TailFollower(engine, p).run) for p in settings.tail]
    if settings.demo:
        tasks.append(("demo", _demo_task(engine)))
    try:
        app = create_app(settings, engine=engine, extra_tasks=tasks)
    except ConfigError:
        engine.close()
        raise
    limits = connection_limits(settings, raise_fd_limit())
    log.info("listening on http://%s:%d (db %s)", settings.host, settings.port, settings.db)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                **serve_options(settings, limits))
    return 0


def _demo_task(engine: Any) -> Any:
    """In-process demo: backfill a week (once per store), then a minute of traffic per minute."""
    import numpy as np

    from .sources import demo

    def run(stop: threading.Event) -> None:
        now = time.time()
        if engine.store.get_meta("demo_backfilled") is None:
            log.info("demo: backfilling 7 days of history")
            for batch in demo.backfill(now - 7 * 86400, now - 60):
                engine.ingest(batch)
                if stop.is_set():
                    return
            engine.store.set_meta("demo_backfilled", "1")
            engine.evaluate()
        rng = np.random.default_rng()
        t = math.floor(time.time() / 60) * 60
        anomaly = demo.first_anomaly(t)
        while not stop.wait(max(0.0, t + 60 - time.time())):
            engine.ingest(demo.minute(t, rng, anomaly=anomaly))
            t += 60
            if t > anomaly.end:
                anomaly = demo.next_anomaly(t, rng)
    return run


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from .engine import Engine
    from .sources.replay import file_problems_report, load_records, replay

    for f in args.files:
        if not Path(f).is_file():
            raise ConfigError(f"replay: no such file {f}")
    engine = Engine(settings)
    records, problems = load_records(args.files, time.time(), settings.attribution())
    totals = replay(engine, records, progress=True)
    engine.close()
    print(f"replayed {len(records)} records: {totals['accepted']} accepted, {totals['duplicate']} duplicate, "
          f"{len(problems)} rejected (db {settings.db})")
    if problems:
        print(file_problems_report(problems), file=sys.stderr)
    return 0


def _tune(settings: Settings, args: argparse.Namespace) -> int:
    from .anomaly.signals import signal_specs
    from .sources.replay import file_problems_report, load_records
    from .sources.tune import thresholds_yaml, tune

    try:
        step = parse_duration(args.step)
    except ValueError as e:
        raise ConfigError(f"tune: --step: {e}") from None
    if step <= 0 or args.target <= 0:
        raise ConfigError("tune: --step and --target must be positive")
    for f in args.files:
        if not Path(f).is_file():
            raise ConfigError(f"tune: no such file {f}")
    records, problems = load_records(args.files, time.time())
    if problems:
        print(file_problems_report(problems), file=sys.stderr)
    if not records:
        raise ConfigError("tune: the files hold no valid record")
    span_days = (records[-1].ts - records[0].ts) / 86400
    if span_days < 7:
        print(f"tune: {span_days:.1f} days of history; a week or more gives thresholds worth keeping", file=sys.stderr)
    proposals, _ = tune(settings, records, step, args.target, lower=args.lower, progress=sys.stderr.isatty())
    print(f"{'signal':<26}{'knob':<20}{'now':>6}{'alerts/week':>13}{'proposed':>10}{'alerts/week':>13}", file=sys.stderr)
    for p in proposals:
        print(f"{p.signal:<26}{p.knob:<20}{p.default:>6g}{p.alerts_per_week_default:>13.2f}{p.proposed:>10g}"
              f"{p.alerts_per_week_proposed:>13.2f}", file=sys.stderr)
    text = thresholds_yaml(proposals, signal_specs(settings.signals), {
        "history": f"{len(records)} records over {span_days:.1f} days ({', '.join(args.files)})",
        "target": f"{args.target:g} false alerts a week over all anomaly signals",
        "tuned": time.strftime("%Y-%m-%d", time.gmtime())})
    if args.write:
        Path(args.write).write_text(text)
        print(f"written: {args.write} (point thresholds_file at it, then run `llm-usage-exporter rules`)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from .sharding import app_key, shard_of

    if args.shards < 1:
        raise ConfigError(f"shard: --shards must be at least 1, got {args.shards}")
    for app in args.apps:
        print(f"{shard_of(app, args.shards)}\t{app_key(app)}")
    return 0


def _rules(settings: Settings, args: argparse.Namespace) -> int:
    from .anomaly.rules import generate
    from .anomaly.signals import signal_specs

    out = Path(args.out)
    if not (out / "thresholds.yml").is_file():
        raise ConfigError(f"rules: {out} holds no thresholds.yml (point --out at prometheus/rules)")
    try:
        specs = signal_specs(settings.signals)
        stale = generate(out, specs, check=args.check)
    except ValueError as e:
        raise ConfigError(f"rules: {e}") from None
    for path in stale:
        print(f"{'differs from the specs' if args.check else 'written'}: {path}")
    return 1 if args.check and stale else 0


def _backtest(settings: Settings, args: argparse.Namespace) -> int:
    from .ingest.records import RecordError, parse_ts
    from .sources.replay import backtest, file_problems_report, load_records

    try:
        step = parse_duration(args.step)
        start = parse_ts(args.start, 0) if args.start else None
        end = parse_ts(args.end, 0) if args.end else None
    except (ValueError, RecordError) as e:
        raise ConfigError(f"backtest: {e}") from None
    if step <= 0:
        raise ConfigError("backtest: --step must be positive")
    for f in args.files:
        if not Path(f).is_file():
            raise ConfigError(f"backtest: no such file {f}")
    records, problems = load_records(args.files, time.time(), settings.attribution())
    if problems:
        print(file_problems_report(problems), file=sys.stderr)
    transitions = backtest(settings, records, start, end, step, progress=sys.stderr.isatty())
    fmt = args.format or ("table" if sys.stdout.isatty() else "json")
    rows = [t.to_dict() for t in transitions]
    for r in rows:
        r["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["at"]))
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"records": len(records), "transitions": rows}, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=["time", "at", "signal", "scope", "series", "from", "to", "current", "baseline", "ratio"])
        w.writeheader()
        w.writerows(rows)
    else:
        print(f"{'time':<21}{'signal':<26}{'scope':<7}{'series':<34}{'change':<17}{'current':>12}{'baseline':>12}{'ratio':>8}")
        for r in rows:
            change = f"{r['from']}->{r['to']}"
            print(f"{r['time']:<21}{r['signal']:<26}{r['scope']:<7}{r['series'][:33]:<34}{change:<17}"
                  f"{_fmt(r['current']):>12}{_fmt(r['baseline']):>12}{_fmt(r['ratio']):>8}")
        print(f"{len(rows)} severity changes over {len(records)} records")
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _demo(args: argparse.Namespace) -> int:
    """Send demo traffic over HTTP: the compose file's `demo` profile runs this. httpx's
    transport retries a connection that is refused (the exporter still starting, or
    restarting) with exponential backoff, about two minutes in all."""
    import httpx
    import numpy as np

    from .sources import demo

    headers = {"Content-Type": "application/json"}
    if args.token_file:
        headers["Authorization"] = "Bearer " + Path(args.token_file).read_text().strip()
    client = httpx.Client(base_url=args.target.rstrip("/"), headers=headers, timeout=30,
                          transport=httpx.HTTPTransport(retries=DEMO_CONNECT_RETRIES))

    def call(method: str, path: str, data: bytes | None = None) -> bytes:
        try:
            r = client.request(method, path, content=data)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise SystemExit(f"demo: gave up on {args.target}{path}: {e}") from None
        return r.content

    def post(batch: list[dict[str, Any]]) -> None:
        call("POST", "/v1/records", orjson.dumps(batch))

    # A second `up` (or a restart of the demo) must not add another week on top of the first.
    counted = demo.requests_counted(call("GET", "/metrics").decode())
    now = time.time()
    if counted:
        print(f"demo: {args.target} already counts {counted:.0f} requests; no backfill", file=sys.stderr)
    else:
        print(f"demo: backfilling {args.days:g} days into {args.target}", file=sys.stderr)
        for batch in demo.backfill(now - args.days * 86400, now - 60):
            post(batch)
    rng = np.random.default_rng()
    t = math.floor(time.time() / 60) * 60
    anomaly = demo.first_anomaly(t)
    print("demo: live traffic; next anomaly", anomaly.kind, "at", time.strftime("%H:%M", time.gmtime(anomaly.start)), file=sys.stderr)
    while True:
        time.sleep(max(0.0, t + 60 - time.time()))
        post(demo.minute(t, rng, anomaly=anomaly))
        t += 60
        if t > anomaly.end:
            anomaly = demo.next_anomaly(t, rng)
            print("demo: next anomaly", anomaly.kind, "at", time.strftime("%H:%M", time.gmtime(anomaly.start)), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
