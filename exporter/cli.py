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
from .config import ENV_PREFIX, FLAG_FORBIDDEN, SCALAR_FIELDS, ConfigError, Settings, load_settings, parse_duration
from .prices import PriceError
from .store import StoreError

log = logging.getLogger("llm_usage_exporter")


def _knob_help() -> str:
    lines = ["every knob (flag / environment variable / YAML key), lowest precedence first:",
             "defaults < --config YAML < environment < flags"]
    for name, f in Settings.model_fields.items():
        flag = "(env/file only)" if name in FLAG_FORBIDDEN else "(YAML only)" if name not in SCALAR_FIELDS else f"--{name.replace('_', '-')}"
        default = f.default if f.default_factory is None else f.default_factory()  # type: ignore[misc]
        env = f"{ENV_PREFIX}{name.upper()}" if name in SCALAR_FIELDS else "-"   # YAML-only knobs have no variable
        lines.append(f"  {name:<22} {flag:<26} {env:<35} default {default!r}: {f.description}")
    return "\n".join(lines)


def _add_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (also LLM_EXPORTER_<NAME> or the YAML file)")
    g.add_argument("--config", help="YAML file of settings (env LLM_EXPORTER_CONFIG)")
    for name in SCALAR_FIELDS:
        if name in FLAG_FORBIDDEN:
            continue
        f = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        env = f"{ENV_PREFIX}{name.upper()}"
        if f.annotation is bool:
            g.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=f"{f.description} [{env}]")
        elif name == "tail":
            g.add_argument(flag, dest=name, action="append", default=None, metavar="PATH", help=f"{f.description} [{env}]")
        else:
            g.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=f"{f.description} [{env}; default {f.default!r}]")


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

    d = sub.add_parser("demo", help="send demo traffic (a week of history, then live with anomalies) to an exporter")
    d.add_argument("--target", default="http://127.0.0.1:9473", help="exporter base URL")
    d.add_argument("--days", type=float, default=7.0, help="days of history to backfill first")
    d.add_argument("--token-file", help="file holding a bearer token for the exporter")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    flags = {n: getattr(args, n) for n in SCALAR_FIELDS if hasattr(args, n) and getattr(args, n) is not None}
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
        settings = _settings(args)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
        return {"serve": _serve, "replay": _replay, "backtest": _backtest}[args.command](settings, args)
    except (ConfigError, PriceError, StoreError) as e:
        print(f"llm-usage-exporter: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.check_binding()
    import uvicorn

    from .api import create_app
    from .connections import connection_limits, raise_fd_limit, serve_options
    from .engine import Engine
    from .tail import TailFollower

    engine = Engine(settings)
    tasks = [TailFollower(engine, p).run for p in settings.tail]
    if settings.demo:
        tasks.append(_demo_task(engine))
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

    from . import demo

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
    from .replay import file_problems_report, load_records, replay

    for f in args.files:
        if not Path(f).is_file():
            raise ConfigError(f"replay: no such file {f}")
    engine = Engine(settings)
    records, problems = load_records(args.files, time.time())
    totals = replay(engine, records, progress=True)
    engine.close()
    print(f"replayed {len(records)} records: {totals['accepted']} accepted, {totals['duplicate']} duplicate, "
          f"{len(problems)} rejected (db {settings.db})")
    if problems:
        print(file_problems_report(problems), file=sys.stderr)
    return 0


def _backtest(settings: Settings, args: argparse.Namespace) -> int:
    from .records import RecordError, parse_ts
    from .replay import backtest, file_problems_report, load_records

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
    records, problems = load_records(args.files, time.time())
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
    """Send demo traffic over HTTP: the compose file's `demo` profile runs this."""
    import urllib.error
    import urllib.request

    import numpy as np

    from . import demo

    headers = {"Content-Type": "application/json"}
    if args.token_file:
        headers["Authorization"] = "Bearer " + Path(args.token_file).read_text().strip()

    def call(path: str, data: bytes | None = None) -> bytes:
        for attempt in range(30):
            try:
                req = urllib.request.Request(args.target.rstrip("/") + path, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.read()
            except (urllib.error.URLError, ConnectionError) as e:
                print(f"demo: {args.target} not reachable ({e}); retrying", file=sys.stderr)
                time.sleep(2)
        raise SystemExit(f"demo: gave up on {args.target}")

    def post(batch: list[dict[str, Any]]) -> None:
        call("/v1/records", orjson.dumps(batch))

    # A second `up` (or a restart of the demo) must not add another week on top of the first.
    counted = sum(float(line.rpartition(" ")[2]) for line in call("/metrics").decode().splitlines()
                  if line.startswith("llm_requests_total{"))
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
