"""python -m benchmark plan: the replicas, and their cores and memory, that serve a target load.

    python -m benchmark plan --rps 1000 --p99-ms 500                    # newest results/*/results.json
    python -m benchmark plan docs/benchmark/results.json --rps 1000 --p99-ms 500

From one benchmark run, per service:

- A core serves what the service measured per CPU (``load.rps`` ÷ ``cpus_per_service``): one
  worker per core, which is how every service sizes itself from its CPU limit. A replica of
  c CPUs runs c workers, and c times the requests.
- No replica is planned busier than ``--utilization``, by default the autoscalers' CPU target
  (read from deploy/k8s/components/classifier/hpa.yaml, so plan and cluster agree): the
  headroom absorbs bursts while new replicas start.
- Latency: each replica is an M/M/c queue (requests arrive at random, c workers serve them;
  Erlang's C formula). Its p99 is the 99th percentile of the wait plus one service time.
  The model draws service times at random too, while these are nearly constant: its
  waits, and so the replica counts, err on the high side.
- Little's law: a replica holds (its request rate × its mean latency) requests in flight,
  printed as "in flight": what its queue must hold, and what the requests-in-progress
  autoscaler (components/scale-on-requests) aims at.
- Memory: the measured peak RSS per worker, times the workers. A bento runs a process
  per worker, so this is close; the Rust service's workers are threads, so this overstates it.

The fewest replicas that keep both the utilization and the p99 within their targets is the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness import REPO

HPA = REPO / "deploy" / "k8s" / "components" / "classifier" / "hpa.yaml"
RESULTS = Path("results")  # where `python -m benchmark run` writes by default
PERCENTILE = 0.99


class PlanError(Exception):
    """A plan cannot be made from these results or targets; the message says why."""


def hpa_cpu_target() -> float:
    """The autoscalers' CPU utilization target, as a fraction: the plan's default headroom."""
    metrics = yaml.safe_load(HPA.read_text())["spec"]["metrics"]
    (percent,) = (
        m["resource"]["target"]["averageUtilization"]
        for m in metrics
        if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    )
    return percent / 100


@dataclass(frozen=True)
class Measured:
    """What one service's benchmark says a core and a worker cost."""

    name: str
    title: str
    rps_per_core: float
    rss_mb_per_worker: float


@dataclass(frozen=True)
class Plan:
    service: Measured
    rps: float
    replicas: int
    cpus: int  # per replica, one worker each

    @property
    def cores(self) -> int:
        return self.replicas * self.cpus

    @property
    def memory_gb(self) -> float:
        return self.cores * self.service.rss_mb_per_worker / 1000

    @property
    def utilization(self) -> float:
        return self.rps / (self.cores * self.service.rps_per_core)

    @property
    def latency(self) -> Latency:
        return replica_latency(self.rps / self.replicas, self.cpus, self.service.rps_per_core)

    @property
    def in_flight(self) -> float:
        """Requests one replica holds, waiting or being served (Little's law)."""
        return self.rps / self.replicas * self.latency.mean_s


@dataclass(frozen=True)
class Latency:
    mean_s: float
    p99_s: float


def erlang_c(workers: int, offered: float) -> float:
    """The probability that a request has to wait in an M/M/c queue (Erlang's C formula).

    ``offered`` is the arrival rate over one worker's service rate; it must stay below ``workers``.
    """
    term = total = 1.0  # offered**k / k!, and its sum over k < workers
    for k in range(1, workers):
        term *= offered / k
        total += term
    waiting = term * offered / workers / (1 - offered / workers)
    return waiting / (total + waiting)


def replica_latency(arrivals: float, workers: int, rate: float) -> Latency:
    """Latency at a replica of ``workers`` workers serving ``rate`` requests/s each, sent ``arrivals``/s."""
    drain = workers * rate - arrivals  # how fast the queue empties
    waits = erlang_c(workers, arrivals / rate)
    service = 1 / rate
    # P(wait > t) = waits * exp(-drain * t)
    p99_wait = math.log(waits / (1 - PERCENTILE)) / drain if waits > 1 - PERCENTILE else 0.0
    return Latency(mean_s=waits / drain + service, p99_s=p99_wait + service)


def in_flight_at(utilization: float, workers: int) -> float:
    """Requests a replica of ``workers`` workers holds on average when ``utilization`` busy.

    It does not depend on how fast a worker is: the autoscaler's requests-in-progress target.
    """
    rate = 1.0  # any: requests in flight are the same at every speed
    arrivals = utilization * workers * rate
    return arrivals * replica_latency(arrivals, workers, rate).mean_s


def plan(service: Measured, rps: float, p99_ms: float, utilization: float, cpus: int) -> Plan:
    """The fewest replicas of ``cpus`` CPUs that keep within ``utilization`` and ``p99_ms``."""
    service_ms = 1000 / service.rps_per_core
    if service_ms >= p99_ms:
        raise PlanError(
            f"{service.name}: a p99 of {p99_ms:g} ms cannot be met: one request alone takes "
            f"{service_ms:.1f} ms of a worker"
        )
    replicas = math.ceil(rps / (utilization * cpus * service.rps_per_core))
    # More replicas shorten the queue, down to one service time, below the target: this ends.
    while (found := Plan(service, rps, replicas, cpus)).latency.p99_s * 1000 > p99_ms:
        replicas += 1
    return found


def newest_results(root: Path = RESULTS) -> Path:
    runs = sorted(root.glob("*/results.json"))  # run ids are timestamps: the last is the newest
    if not runs:
        raise PlanError(
            f"no {root}/*/results.json: run `python -m benchmark run`, or give a results.json "
            "(docs/benchmark/results.json is the README's)"
        )
    return runs[-1]


def load(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except OSError as error:
        raise PlanError(f"cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise PlanError(f"{path} is not valid JSON") from None
    if not isinstance(results, dict) or not {"setup", "services"} <= results.keys():
        raise PlanError(f"{path} is not a benchmark's results.json (no setup and services)")
    return results


def measured(results: dict, name: str, source: str) -> Measured:
    """One service's figures, or a PlanError saying why the run cannot be planned from."""
    found = results.get("services", {}).get(name)
    if found is None:
        raise PlanError(
            f"{source} has no results for {name} (it has: {', '.join(results.get('services', {})) or 'none'})"
        )
    if found.get("status") != "ok":
        reason = (found.get("error") or found.get("status")).splitlines()[0]  # not the log lines that follow
        raise PlanError(f"{source}: {name} failed in this run ({reason}): there is nothing to plan from")
    if not found["load"]["rps"] > 0:
        raise PlanError(f"{source}: {name} served no requests in this run: there is nothing to plan from")
    settings = results["setup"]["settings"]
    return Measured(
        name=name,
        title=found["title"],
        rps_per_core=found["load"]["rps"] / settings["cpus_per_service"],
        rss_mb_per_worker=found["resources"]["rss_mb_peak"] / settings["workers_per_service"],
    )


def count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def table(plans: list[Plan]) -> list[str]:
    header = (
        "service",
        "req/s per core",
        "replicas × CPUs",
        "cores",
        "memory (GB)",
        "busy",
        "p99 (ms)",
        "in flight",
    )
    rows = [
        (
            p.service.title,
            f"{p.service.rps_per_core:,.1f}",
            f"{p.replicas:,} × {p.cpus}",
            f"{p.cores:,}",
            f"{p.memory_gb:,.1f}",
            f"{p.utilization:.0%}",
            f"{p.latency.p99_s * 1000:,.0f}",
            f"{p.in_flight:.2f}",
        )
        for p in plans
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        first, *rest = cells
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    return [line(header), *(line(row) for row in rows)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        help=f"a results.json or its run folder (default: the newest {RESULTS}/*/results.json)",
    )
    parser.add_argument("--rps", type=positive, required=True, help="target requests per second")
    parser.add_argument("--p99-ms", type=positive, required=True, help="target 99th-percentile latency (ms)")
    parser.add_argument(
        "--utilization",
        type=fraction,
        help=f"the busiest a replica may be, 0-1 (default: the autoscalers' CPU target in {HPA.relative_to(REPO)})",
    )
    parser.add_argument(
        "--cpus-per-replica", type=whole, help="CPUs (and workers) per replica (default: as benchmarked)"
    )
    parser.add_argument("--services", help="comma-separated subset (default: every service in the results)")


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def whole(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text}")
    return int(text)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def main(args: argparse.Namespace) -> int:
    """Print the plan of every service that can be planned; 1 if any cannot (said on stderr)."""
    try:
        path = args.results or newest_results()
        if path.is_dir():
            path = path / "results.json"
        results = load(path)
        utilization = args.utilization or hpa_cpu_target()
        cpus = args.cpus_per_replica or results["setup"]["settings"]["cpus_per_service"]
        names = [n.strip() for n in (args.services or ",".join(results["services"])).split(",") if n.strip()]
        if not names:
            raise PlanError(f"{path} holds no services")
    except PlanError as error:
        print(f"plan: error: {error}", file=sys.stderr)
        return 1
    plans, errors = [], []
    for name in names:
        try:
            plans.append(plan(measured(results, name, str(path)), args.rps, args.p99_ms, utilization, cpus))
        except PlanError as error:
            errors.append(str(error))
    setup, settings = results["setup"], results["setup"]["settings"]
    print(
        f"{args.rps:,g} req/s at p99 ≤ {args.p99_ms:,g} ms, no replica over {utilization:.0%} busy, from {path}\n"
        f"(run {setup['run_id']}: {setup['host']['cpu_model']}, {setup['mode']} mode, each service on "
        f"{count(settings['cpus_per_service'], 'CPU')} with {count(settings['workers_per_service'], 'worker')})\n"
    )
    if plans:
        print("\n".join(table(plans)))
        print(
            "\nbusy: CPU utilization at the target rate. p99: M/M/c estimate (errs high). in flight: requests\n"
            "per replica (Little's law). memory: measured peak RSS per worker × workers."
        )
    for error in errors:
        print(f"plan: error: {error}", file=sys.stderr)
    return 1 if errors else 0
