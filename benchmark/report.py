"""report.md and PNG charts, rendered from a run's results.json and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MISSING = "—"
COLORS = {"torch": "#d9822b", "onnx": "#2b83d9", "rust": "#3aa655"}


def render(run_dir: Path) -> Path:
    results = json.loads((run_dir / "results.json").read_text())
    charts = draw_charts(results, run_dir)
    report = run_dir / "report.md"
    report.write_text(markdown(results, charts))
    return report


def value(service: dict, section: str, key: str, digits: int = 1) -> str:
    found = service.get(section, {}).get(key) if section else service.get(key)
    if found is None:
        return MISSING
    return f"{found:,.{digits}f}" if isinstance(found, float) else f"{found:,}"


def identifier(service: dict, key: str, short: bool = False) -> str:
    """A model tag, hash or image ID from the service's ``measured`` section, as code."""
    found = service.get("measured", {}).get(key)
    if not found:
        return MISSING
    return f"`{found.removeprefix('sha256:')[:12]}`" if short else f"`{found}`"


def startup_steps(service: dict) -> str:
    """Where a bento's start-up goes: `bentoml serve`, then its worker's steps (benchmark.measure.startup_steps)."""
    steps = service.get("startup", {}).get("steps_s_median")
    if not steps:
        return "—"
    return "<br>".join(f"{step.replace('_', ' ')} {seconds:.2f}" for step, seconds in steps.items())


def endpoint_rows(endpoints: list[str], seconds: int | None) -> list[tuple]:
    """req/s and p99 through each endpoint, and how each compares with base64 JSON."""
    rows = []
    for endpoint in endpoints:

        def cell(s, endpoint=endpoint):
            section = s.get("endpoints", {}).get(endpoint, {})
            figures = f"{value(section, 'load', 'rps')} / {value(section, 'load', 'p99_ms', 0)}"
            base = s.get("endpoints", {}).get("json", {}).get("load", {}).get("rps")
            found = section.get("load", {}).get("rps")
            return f"{figures} (×{found / base:.2f})" if endpoint != "json" and found and base else figures

        rows.append((f"`{endpoint}` endpoint: req/s / p99 ms" + (" (× json)" if endpoint != "json" else ""), cell))
    return rows


def batching_rows(max_batch_size: int) -> list[tuple]:
    if max_batch_size <= 1:
        return []

    def cell(s):
        batched = s.get("batching", {})
        found, off = batched.get("load", {}).get("rps"), s.get("load", {}).get("rps")
        figures = f"{value(batched, 'load', 'rps')} / {value(batched, 'load', 'p99_ms', 0)}"
        return f"{figures} (×{found / off:.2f})" if found and off else figures

    def memory(s):
        return value(s.get("batching", {}), "resources", "rss_mb_peak", 0)

    return [
        (f"batching on (max {max_batch_size}): req/s / p99 ms (× off)", cell),
        ("batching on: peak memory (MB)", memory),
    ]


def markdown(results: dict, charts: list[str]) -> str:
    setup, services = results["setup"], results["services"]
    settings, host = setup["settings"], setup["host"]
    names = list(services)
    lines = [
        f"# Benchmark {setup['run_id']}",
        "",
        f"{setup['date']}, git `{setup['git_sha'][:12]}`, {setup['mode']} mode, profile `{settings['profile']}`.  ",
        f"Host: {host['cpu_model']}, {host['cores']} cores, {host['memory_gb']} GiB, Linux {host['kernel']}.  ",
        f"Each service alone on CPU {settings['service_cpus']} ({settings['workers_per_service']} worker(s), "
        f"{settings['intra_op_threads_per_worker']} intra-op thread each); Locust on CPU {settings['locust_cpus']} "
        f"with {settings['users']} users, after a {settings['warmup_s']} s warm-up; "
        + (
            f"{settings['request_limit']:,} requests measured (or {settings['duration_s']} s, whichever came first)."
            if settings["request_limit"]
            else f"{settings['duration_s']} s measured."
        ),
        f"Image: {setup['payload']['bytes']:,} bytes ({setup['payload']['source']})"
        + (f", {setup['payload']['json_bytes']:,} bytes as base64 JSON." if "json_bytes" in setup["payload"] else "."),
        "",
    ]
    failed = {name: s["error"] for name, s in services.items() if s.get("error")}
    if failed:
        lines += ["## Failures", ""] + [f"- **{services[n]['title']}**: {e}" for n, e in failed.items()] + [""]

    header = "| | " + " | ".join(services[n]["title"] for n in names) + " |"
    rule = "|---|" + "---:|" * len(names)
    rows = [
        ("status", lambda s: s["status"]),
        ("requests/s", lambda s: value(s, "load", "rps")),
        ("latency p50 (ms)", lambda s: value(s, "load", "p50_ms")),
        ("latency p90 (ms)", lambda s: value(s, "load", "p90_ms")),
        ("latency p95 (ms)", lambda s: value(s, "load", "p95_ms")),
        ("latency p99 (ms)", lambda s: value(s, "load", "p99_ms")),
        ("latency max (ms)", lambda s: value(s, "load", "max_ms")),
        ("requests / failed", lambda s: f"{value(s, 'load', 'requests')} / {value(s, 'load', 'failures')}"),
        *endpoint_rows(settings.get("endpoints", []), settings.get("compare_s")),
        *batching_rows(settings.get("max_batch_size", 1)),
        (
            "server CPU mean / peak (%)",
            lambda s: (
                f"{value(s, 'resources', 'cpu_percent_mean', 0)} / {value(s, 'resources', 'cpu_percent_peak', 0)}"
            ),
        ),
        (
            "resident memory mean / peak (MB)",
            lambda s: f"{value(s, 'resources', 'rss_mb_mean', 0)} / {value(s, 'resources', 'rss_mb_peak', 0)}",
        ),
        ("image size (MB)", lambda s: value(s, None, "image_size_mb")),
        (
            "start → /readyz median / p95 (s)",
            lambda s: f"{value(s, 'startup', 'readyz_s_median', 3)} / {value(s, 'startup', 'readyz_s_p95', 3)}",
        ),
        ("start → first /predict median (s)", lambda s: value(s, "startup", "first_predict_s_median", 3)),
        (
            "`docker run` of its image exiting at once, median (s)",
            lambda s: value(s, "startup", "docker_exit_s_median", 3),
        ),
        ("start-up steps, median (s)", startup_steps),
        ("model measured", lambda s: identifier(s, "model_tag")),
        ("model file sha256", lambda s: identifier(s, "model_sha256", short=True)),
        ("image ID", lambda s: identifier(s, "image_id", short=True)),
    ]
    lines += ["## Results", "", header, rule]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(services[n]) for n in names) + " |")

    lines += [
        "",
        "## Ceilings and ratios",
        "",
        "The ceiling is the same work (JSON, base64, decode, preprocess, inference, response JSON) done in-process "
        "on one thread of the same CPU, as fast as possible.",
        "",
        "| runtime | in-process requests/s | mean (ms) |",
        "|---|---:|---:|",
    ]
    for runtime, ceiling in results["ceilings"].items():
        if "error" in ceiling:
            lines.append(f"| {runtime} | not measured: {ceiling['error']} | |")
        else:
            lines.append(f"| {runtime} | {ceiling['rps']:,.1f} | {ceiling['mean_ms']:.2f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for key, ratio in results.get("ratios", {}).items():
        lines.append(f"| {key.replace('_', ' ')} | {ratio:.2f} |")
    lines += ["", "Absolute numbers depend on the machine; compare the ratios.", ""]
    if settings.get("max_batch_size", 1) > 1:
        lines += [
            "Batching: each service was restarted with MAX_BATCH_SIZE and measured on the first endpoint. "
            "On a CPU core ONNX Runtime and torch run a batch at about the cost per image of single images, "
            "so batching can only add queueing (and, in the bentos, a second process and a hop between them); "
            "it pays where a batch is cheaper per image than one at a time, as on a GPU.",
            "",
        ]
    lines += [f"![{chart}]({chart})" for chart in charts]
    return "\n".join(lines) + "\n"


def draw_charts(results: dict, run_dir: Path) -> list[str]:
    services = results["services"]
    titles = [s["title"] for s in services.values()]
    colors = [COLORS.get(name, "#888888") for name in services]
    drawn = []

    def bar_chart(file: str, title: str, ylabel: str, values: list, log: bool = False) -> None:
        figure, axis = plt.subplots(figsize=(7, 4))
        heights = [v if v is not None else 0 for v in values]
        bars = axis.bar(titles, heights, color=colors)
        for bar, v in zip(bars, values, strict=True):
            axis.annotate(
                "failed" if v is None else f"{v:,.3g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        if log and any(heights):
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_ylabel(ylabel)
        figure.tight_layout()
        figure.savefig(run_dir / file, dpi=110)
        plt.close(figure)
        drawn.append(file)

    def get(service, section, key):
        return service.get(section, {}).get(key) if section else service.get(key)

    bar_chart("throughput.png", "Throughput", "requests/s", [get(s, "load", "rps") for s in services.values()])

    figure, axis = plt.subplots(figsize=(7, 4))
    percentiles = ["p50_ms", "p90_ms", "p95_ms", "p99_ms"]
    width = 0.8 / max(len(services), 1)
    for i, (service, color) in enumerate(zip(services.values(), colors, strict=True)):
        load = service.get("load", {})
        axis.bar(
            [p + i * width for p in range(len(percentiles))],
            [load.get(k) or 0 for k in percentiles],
            width,
            label=service["title"],
            color=color,
        )
    axis.set_xticks(
        [p + width * (len(services) - 1) / 2 for p in range(len(percentiles))],
        [k.removesuffix("_ms") for k in percentiles],
    )
    axis.set_ylabel("ms")
    axis.set_title("Latency percentiles")
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "latency.png", dpi=110)
    plt.close(figure)
    drawn.append("latency.png")

    bar_chart(
        "memory.png",
        "Peak resident memory under load",
        "MB",
        [get(s, "resources", "rss_mb_peak") for s in services.values()],
    )
    if results["setup"]["mode"] == "container":
        bar_chart("image_size.png", "Image size", "MB", [get(s, None, "image_size_mb") for s in services.values()])
    bar_chart(
        "startup.png",
        "Start to /readyz (median)",
        "s (log scale)",
        [get(s, "startup", "readyz_s_median") for s in services.values()],
        log=True,
    )
    return drawn
