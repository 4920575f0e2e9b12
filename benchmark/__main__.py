"""python -m benchmark: compare the three services side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark import overload, plan
from benchmark.run import PROFILES, Settings, SettingsError, run
from harness import docker
from weather.endpoints import ENDPOINTS
from weather.registry import SERVICES

EPILOG = """\
profiles:
  quick   50 users, 5 s warm-up + 20 s measured per service, 20 s per other endpoint and with
          batching on, 3 cold starts, 8 s ceilings (about 10 minutes)
  full    50 users, 15 s warm-up + 40,000 requests per service (like the original; at most 1 hour each),
          120 s per other endpoint and with batching on, 15 cold starts, 20 s ceilings
Explicit options override the profile's values.

Endpoints (--endpoints, docs/contract.md): json sends the image as base64 in JSON, upload as
multipart/form-data, raw as the body. The first is measured for --duration/--requests; each other
endpoint, and the first again with adaptive batching on (MAX_BATCH_SIZE=--max-batch-size, a
restarted service), for --compare-seconds.

Each service runs alone on the same dedicated CPUs (the first N of this process's CPUs) with one
worker per CPU and one intra-op thread per worker; Locust runs on the remaining CPUs. Results go to
OUT/<run-id>/: results.json, report.md, charts (PNG), logs.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_parser = commands.add_parser(
        "run", help="run the benchmark", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run_parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    run_parser.add_argument(
        "--mode",
        choices=("container", "process"),
        help="container (default when a Docker engine is available) or process",
    )
    run_parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of: %(default)s")
    run_parser.add_argument("--cpus", type=int, default=1, help="CPUs per service (default 1)")
    run_parser.add_argument("--users", type=int, help="concurrent Locust users")
    run_parser.add_argument("--duration", type=int, help="measured seconds per service")
    run_parser.add_argument("--warmup", type=int, help="warm-up seconds per service")
    run_parser.add_argument("--requests", type=int, help="stop the measured window after this many requests")
    run_parser.add_argument("--startup-runs", type=int, help="cold starts per service")
    run_parser.add_argument("--ceiling-seconds", type=int, help="seconds per in-process ceiling measurement")
    run_parser.add_argument("--payload", type=Path, help="a JPEG/PNG image or a JSON payload (default: generated)")
    run_parser.add_argument(
        "--endpoints",
        default=",".join(ENDPOINTS),
        help="comma-separated subset of %(default)s; the first is the main measurement",
    )
    run_parser.add_argument("--compare-seconds", type=int, help="measured seconds per other endpoint and for batching")
    run_parser.add_argument(
        "--max-batch-size", type=int, default=8, help="batching on, compared with off (default 8; 1 skips it)"
    )
    run_parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")

    report_parser = commands.add_parser("report", help="render report.md and the charts again from results.json")
    report_parser.add_argument("run_dir", type=Path)

    plan_parser = commands.add_parser(
        "plan",
        help="replicas, cores and memory for a target request rate and p99, from a run's results.json",
        description=plan.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_arguments(plan_parser)

    overload_parser = commands.add_parser(
        "overload",
        help="useful throughput under overload (503s, not latency) and memory after a spike",
        description=overload.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    overload.add_arguments(overload_parser)

    args = parser.parse_args(argv)
    if args.command == "overload":
        return overload.main(args)
    if args.command == "report":
        from benchmark.report import render

        print(render(args.run_dir))
        return 0
    if args.command == "plan":
        return plan.main(args)

    services = [name.strip() for name in args.services.split(",") if name.strip()]
    unknown = set(services) - set(SERVICES)
    if unknown:
        parser.error(f"unknown services: {', '.join(sorted(unknown))}")
    endpoints = tuple(name.strip() for name in args.endpoints.split(",") if name.strip())
    unknown = set(endpoints) - set(ENDPOINTS)
    if unknown or not endpoints:
        parser.error(
            f"--endpoints: unknown {', '.join(sorted(unknown)) or 'none given'}; known: {', '.join(ENDPOINTS)}"
        )
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    profile = PROFILES[args.profile]
    mode = args.mode or ("container" if docker.available() is None else "process")

    def pick(value, key):
        return profile[key] if value is None else value

    settings = Settings(
        profile=args.profile,
        mode=mode,
        services=[SERVICES[name] for name in services],
        cpus_per_service=args.cpus,
        users=pick(args.users, "users"),
        duration_s=pick(args.duration, "duration_s"),
        warmup_s=pick(args.warmup, "warmup_s"),
        startup_runs=pick(args.startup_runs, "startup_runs"),
        ceiling_s=pick(args.ceiling_seconds, "ceiling_s"),
        request_limit=pick(args.requests, "request_limit"),
        payload=args.payload,
        out=args.out,
        endpoints=endpoints,
        max_batch_size=args.max_batch_size,
        compare_s=pick(args.compare_seconds, "compare_s"),
    )
    try:
        results = run(settings)
    except SettingsError as error:
        print(f"benchmark: error: {error}", file=sys.stderr)
        return 2
    failed = {name: s.get("error") or s["status"] for name, s in results["services"].items() if s["status"] != "ok"}
    for name, reason in failed.items():
        print(f"benchmark: {name} FAILED: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
