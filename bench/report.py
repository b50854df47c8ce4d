"""Markdown tables of a `bench.run` result (the JSON written next to them)."""

from __future__ import annotations

from pathlib import Path

from bench.segmentation_cells import markdown as segmentation_cells_markdown


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def _machine(m: dict) -> list[str]:
    return [
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores "
        f"({m['usable_cores']} usable), {m['ram_gib']} GiB RAM, {m['platform']}; Python "
        f"{m['python']}, torch {m['torch']} ({m['torch_threads_per_process']} threads per "
        f"process), CUDA {'yes' if m['cuda'] else 'no'}, Ray {m.get('ray') or 'absent'}.",
        f"Load average at start (1/5/15 min): {', '.join(map(str, m['load_average_at_start']))}"
        f" -- started {m['started_at']}.",
        "",
    ]


def render(r: dict) -> str:
    s = r["sizes"]
    lines = ["# MarrowScope benchmarks (`make bench`)", ""]
    lines += _machine(r["machine"])
    lines += [
        f"Sizes `{s['name']}`: smear images {s['image_wh'][0]}x{s['image_wh'][1]}, "
        f"{s['cells_per_image']} cells per image, celltype crops {s['crop']} px "
        f"(32 per request), npm1 input {s['npm1_hw'][0]}x{s['npm1_hw'][1]} (HxW). "
        f"Untrained models (throughput only). Medians over {r['settings']['repeats']} "
        "repeats; ratios are medians of per-repeat pairs measured back to back.",
        "",
    ]

    lines += [
        "## Served (OIP gRPC) vs in-process, per model",
        "",
        "| model | concurrency | in-process req/s | served req/s | served / in-process "
        "| served p50 ms | served p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r.get("per_model", []):
        lines.append(
            f"| {row['model']} | {row['concurrency']} | "
            f"{_f(row['in_process']['throughput_per_s'])} | "
            f"{_f(row['served']['throughput_per_s'])} | {_f(row['throughput_ratio'])} | "
            f"{_ms(row['served']['p50_s'])} | {_ms(row['served']['p99_s'])} | "
            f"{row['served']['errors'] + row['in_process']['errors']} |"
        )

    b = r.get("batching")
    if b:
        lines += [
            "",
            f"## Dynamic batching, npm1, concurrency {b['concurrency']}",
            "",
            f"MAX_BATCH_SIZE {b['max_batch_size']}, MAX_QUEUE_DELAY_MS "
            f"{b['max_queue_delay_ms']} vs MAX_BATCH_SIZE 1.",
            "",
            "| | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
        ]
        for side in ("batched", "unbatched"):
            lines.append(
                f"| {side} | {_f(b[side]['throughput_per_s'])} | {_ms(b[side]['p50_s'])} "
                f"| {_ms(b[side]['p99_s'])} |"
            )
        lines += [
            "",
            f"Throughput ratio batched / unbatched: **{_f(b['throughput_ratio'])}**; "
            f"p99 ratio: {_f(b['p99_ratio'])}.",
        ]

    lines += [
        "",
        "## Whole pipeline: gateway (REST + 5 services) vs one process",
        "",
        "| concurrency | in-process cases/s | gateway cases/s | gateway / in-process | "
        "in-process p50 / p99 ms | gateway p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r.get("pipeline", []):
        g, i = row["gateway"], row["in_process"]
        lines.append(
            f"| {row['concurrency']} | {_f(i['throughput_per_s'])} | "
            f"{_f(g['throughput_per_s'])} | {_f(row['throughput_ratio'])} | "
            f"{_ms(i['p50_s'])} / {_ms(i['p99_s'])} | {_ms(g['p50_s'])} / "
            f"{_ms(g['p99_s'])} | {g['errors'] + i['errors']} |"
        )

    if r.get("segmentation_cells"):
        lines += ["", *segmentation_cells_markdown(r["segmentation_cells"])]

    p = r.get("peer") or {}
    lines += ["", "## Peer: npm1 on our runtime vs Ray Serve", ""]
    if p.get("ran"):
        lines += [
            f"Same weights, same batch settings (max batch {p['max_batch_size']}, wait "
            f"{p['max_queue_delay_ms']} ms); ingress: {p['ingress']}.",
            "",
            "| concurrency | ours req/s | Ray Serve req/s | ours / Ray (throughput) | "
            "ours p99 ms | Ray p99 ms | ours / Ray (p99) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in p["rows"]:
            lines.append(
                f"| {row['concurrency']} | {_f(row['ours']['throughput_per_s'])} | "
                f"{_f(row['ray_serve']['throughput_per_s'])} | "
                f"{_f(row['throughput_ratio'])} | {_ms(row['ours']['p99_s'])} | "
                f"{_ms(row['ray_serve']['p99_s'])} | {_f(row['p99_ratio'])} |"
            )
    else:
        lines.append(f"Not run: {p.get('why', 'unknown')}")

    lines += [
        "",
        "## Memory and cold start per service",
        "",
        "| service | peak RSS MiB | cold start s (spawn to SERVING) |",
        "|---|---|---|",
    ]
    cold = {c["service"]: c["cold_start_s"] for c in r.get("cold_start", [])}
    rss = r.get("peak_rss_bytes", {})
    for name in sorted(set(cold) | set(rss)):
        mib = rss.get(name)
        lines.append(
            f"| {name} | {'n/a' if mib is None else round(mib / 2**20)} | {_f(cold.get(name))} |"
        )

    gen = r.get("generator_images_per_s", {})
    lines += [
        "",
        "## Synthetic generator (one process, no file writing)",
        "",
        "| size | images/s |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_f(v)} |" for k, v in gen.items()]
    lines += ["", f"Total benchmark time: {r.get('elapsed_s')} s.", ""]
    return "\n".join(lines)


def write_markdown(result: dict, path: Path) -> str:
    text = render(result)
    path.write_text(text)
    return text
