"""Draws the figures of docs/benchmarks.md from the tables in that page.

    python tools/benchmark_plots.py   # writes docs/img/bench_*.png (needs matplotlib)

The benchmark scripts (benchmarks/*.py) print their results; the tables in
docs/benchmarks.md record them with the machine and the run they came from.
This script reads those tables (so a plot never shows other numbers than the
page) and draws what is easier to see than to read: the spread of the repeats,
memory side by side, throughput per configuration. Rerun it after updating a
table and commit the PNGs; tests/test_docs.py checks that every table it reads
is still there with the columns it needs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of `text`: (header cells, rows of cells)."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|[\s\-:|]+\|$", lines[i + 1].strip()):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_with(text: str, *columns: str) -> tuple[list[str], list[list[str]]]:
    """The first table whose header has every one of `columns` (exact cell text)."""
    for header, rows in tables(text):
        if all(c in header for c in columns):
            return header, rows
    raise LookupError(f"docs/benchmarks.md has no table with the columns {columns}")


def number(cell: str) -> float:
    """The first number in a cell ("**1.21**", "337.1 (337.1, ...)", "567.3 ms")."""
    match = re.search(r"-?\d+(?:\.\d+)?", cell.replace(",", ""))
    if match is None:
        raise ValueError(f"no number in {cell!r}")
    return float(match.group())


def figures(text: str) -> dict:
    """Everything the plots show, read from the page's tables."""
    header, rows = table_with(
        text, "config", "global batch", "median samples/s", "spread", "all repeats"
    )
    col = {name: header.index(name) for name in header}
    data_parallel = [
        {
            "config": row[col["config"]],
            "devices": int(number(row[col["devices"]])),
            "batch": int(number(row[col["global batch"]])),
            "median": number(row[col["median samples/s"]]),
            "repeats": [float(v) for v in row[col["all repeats"]].split()],
        }
        for row in rows
    ]
    header, rows = table_with(text, "configuration", "peak MiB (3 runs)")
    memory = [(row[0], number(row[1])) for row in rows]
    header, rows = table_with(
        text, "run", "plain batch 8", "GradientAccumulation b32/m8", "Keras 3 GA k=4, batch 8"
    )
    last = rows[-1]
    speed = [
        ("plain fit, batch 8", number(last[1])),
        ("GradientAccumulation, batch 32, micro 8", number(last[2])),
        ("Keras gradient_accumulation_steps=4, batch 8", number(last[3])),
    ]
    header, rows = table_with(text, "configuration", "samples/s", "/ DP, jit=False")
    xla = [(row[0], number(row[1])) for row in rows]
    header, rows = table_with(text, "backend", "bare model samples/s", "DataParallel over one GPU")
    gpu = [(row[0], number(row[1]), number(row[2])) for row in rows]
    header, rows = table_with(
        text, "epoch", "one device, batch 16", "DataParallel per_slice + GA 2"
    )
    batch_norm = {
        "configs": header[1:],
        "epochs": [int(number(row[0])) for row in rows],
        "accuracy": [[number(cell) for cell in row[1:]] for row in rows],
    }
    return {
        "batch_norm": batch_norm,
        "data_parallel": data_parallel,
        "accumulation_memory": memory,
        "accumulation_speed": speed,
        "xla": xla,
        "gpu_one_device": gpu,
    }


def _figure(width=7.5, height=3.6):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    return figure, figure.add_subplot()


def plot_data_parallel(rows, path):
    """Per global batch: two one-core processes side by side, DataParallel and
    MirroredStrategy, as fractions of the physical limit (bars: medians; dots: each repeat)."""
    figure, axes = _figure()
    shown = {"two apart": "#9e9e9e", "DataParallel 2": "#3f51b5", "Mirrored 2": "#e07b39"}
    batches = sorted({r["batch"] for r in rows})
    for g, batch in enumerate(batches):
        same = {r["config"]: r for r in rows if r["batch"] == batch}
        limit = 2 * same["one core"]["median"]
        for k, (config, color) in enumerate(shown.items()):
            x = g * 4 + k
            if config not in same:  # tables from before "two apart" was measured
                continue
            row = same[config]
            axes.bar(
                x, row["median"] / limit, color=color, alpha=0.85, label=config if g == 0 else None
            )
            axes.scatter(
                [x] * len(row["repeats"]),
                [v / limit for v in row["repeats"]],
                s=12,
                color="black",
                zorder=3,
                label="each repeat" if g == 0 and k == 0 else None,
            )
    axes.axhline(1.0, color="#7f7f7f", linestyle="--", label="physical limit (2 x one core)")
    axes.axhline(0.95, color="#3f51b5", linestyle=":", label="goal (0.95)")
    axes.set_xticks([g * 4 + 1 for g in range(len(batches))])
    axes.set_xticklabels([f"global batch {b}" for b in batches])
    axes.set_ylabel("fraction of the physical limit")
    axes.set_ylim(0, 1.15)
    axes.set_title("Two one-core processes, DataParallel and MirroredStrategy on 2 logical CPUs")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def plot_accumulation(memory, speed, path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4), dpi=100)
    left = figure.add_subplot(1, 2, 1)
    right = figure.add_subplot(1, 2, 2)
    labels = ["plain fit,\nbatch 32", "GradientAccumulation,\nbatch 32, micro 8"]
    left.bar(labels, [m for _, m in memory], color=["#7f7f7f", "#3f51b5"])
    for i, (_, m) in enumerate(memory):
        left.text(i, m, f"{m:g} MiB", ha="center", va="bottom", fontsize=9)
    left.set_ylabel("allocator peak, MiB")
    left.set_title("Peak memory over an epoch", fontsize=10)
    short = ["plain,\nbatch 8", "GradientAccumulation\nb32/m8", "Keras GA k=4,\nbatch 8"]
    right.bar(short, [s for _, s in speed], color=["#7f7f7f", "#3f51b5", "#e07b39"])
    for i, (_, s) in enumerate(speed):
        right.text(i, s, f"{s:g}", ha="center", va="bottom", fontsize=9)
    right.set_ylabel("samples/s (median of 3)")
    right.set_title("Speed (idle machine)", fontsize=10)
    for axes in (left, right):
        axes.tick_params(axis="x", labelsize=8)
        axes.set_ylim(0, axes.get_ylim()[1] * 1.1)
    figure.tight_layout()
    figure.savefig(path)


def plot_bars(items, path, title, xlabel, highlight=None, height=3.4):
    figure, axes = _figure(8, height)
    labels = [label for label, _ in items]
    values = [value for _, value in items]
    colors = ["#3f51b5" if highlight and highlight(label) else "#7f7f7f" for label in labels]
    axes.barh(range(len(items)), values, color=colors)
    axes.set_yticks(range(len(items)))
    axes.set_yticklabels([_wrap(label) for label in labels], fontsize=8)
    axes.invert_yaxis()
    for i, value in enumerate(values):
        axes.text(value, i, f" {value:g}", va="center", fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)


def plot_gpu(rows, path):
    figure, axes = _figure(6, 3.2)
    for i, (_, bare, dp) in enumerate(rows):
        axes.bar(i * 3, bare, color="#7f7f7f", label="bare model" if i == 0 else None)
        axes.bar(i * 3 + 1, dp, color="#3f51b5", label="DataParallel, one GPU" if i == 0 else None)
        axes.text(i * 3 + 1, dp, f"{dp / bare:.3f}x", ha="center", va="bottom", fontsize=9)
    axes.set_xticks([i * 3 + 0.5 for i in range(len(rows))])
    axes.set_xticklabels([backend for backend, _, _ in rows])
    axes.set_ylabel("samples/s (median of 7)")
    axes.set_title("DataParallel over one H100 vs the bare model", fontsize=10)
    axes.set_ylim(0, axes.get_ylim()[1] * 1.1)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def plot_batch_norm(curves, path):
    """Held-out accuracy per epoch (median over the seeds), one line per configuration."""
    figure, axes = _figure(7, 3.6)
    styles = ["-", "--", "-", ":"]
    colors = ["#7f7f7f", "#3f51b5", "#2e7d32", "#e07b39"]
    for k, config in enumerate(curves["configs"]):
        values = [row[k] for row in curves["accuracy"]]
        axes.plot(
            curves["epochs"], values, styles[k % 4], color=colors[k % 4], label=config, marker="."
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel("held-out accuracy (median of the seeds)")
    axes.set_title("BatchNormalization, 2 clips per device: whole-batch vs per-slice", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _wrap(label: str, width: int = 45) -> str:
    label = label.replace("`", "")
    words, lines, line = label.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def main() -> int:
    data = figures(PAGE.read_text())
    os.makedirs(IMG, exist_ok=True)
    plot_data_parallel(data["data_parallel"], IMG / "bench_data_parallel.png")
    plot_accumulation(
        data["accumulation_memory"], data["accumulation_speed"], IMG / "bench_accumulation.png"
    )
    plot_bars(
        data["xla"],
        IMG / "bench_xla.png",
        "XLA and jit_compile: two logical CPUs, global batch 16",
        "samples/s (median of 5)",
        highlight=lambda label: label.startswith("DataParallel"),
    )
    plot_gpu(data["gpu_one_device"], IMG / "bench_gpu_one_device.png")
    plot_batch_norm(data["batch_norm"], IMG / "bench_batch_norm.png")
    for name in ("data_parallel", "accumulation", "xla", "gpu_one_device", "batch_norm"):
        print(IMG / f"bench_{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
