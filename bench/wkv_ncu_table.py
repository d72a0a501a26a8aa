"""Per-kernel table of an ncu CSV written by bench/wkv_ncu.sh (`--csv --page details`).

    python bench/wkv_ncu_table.py OUT/ncu_8x1024x768.csv [...]

Each profiled kernel launch gets a row: its duration under ncu (serialised, caches flushed), DRAM and
SM throughput as % of peak, achieved / theoretical occupancy, waves per SM, registers, warp cycles per
issued instruction and the share of cycles with no eligible warp; then the sum over one fwd+bwd call.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

COLUMNS = {  # column title: (section, metric)
    "us": ("GPU Speed Of Light Throughput", "Duration"),
    "DRAM %": ("GPU Speed Of Light Throughput", "DRAM Throughput"),
    "SM %": ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    "occupancy % (theory)": ("Occupancy", "Achieved Occupancy"),
    "waves": ("Launch Statistics", "Waves Per SM"),
    "regs": ("Launch Statistics", "Registers Per Thread"),
    "cycles/issue": ("Warp State Statistics", "Warp Cycles Per Issued Instruction"),
    "no eligible %": ("Scheduler Statistics", "No Eligible"),
}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def kernels(path: Path) -> list[dict]:
    """One dict per profiled launch, in launch order: name, grid, block and the metrics by (section, name)."""
    lines = (line for line in path.read_text().splitlines() if line.startswith('"'))
    by_id: dict[int, dict] = {}
    for row in csv.DictReader(lines):
        name = re.sub(r"^.*::|\(.*$", "", row["Kernel Name"])  # "<unnamed>::fwd_x(int, ...)" -> "fwd_x"
        launch = by_id.setdefault(int(row["ID"]), {"name": name, "grid": row["Grid Size"], "block": row["Block Size"]})
        if row["Metric Name"]:
            launch[(row["Section Name"], row["Metric Name"])] = row["Metric Value"]
    return [by_id[i] for i in sorted(by_id)]


def table(path: Path, calls: int = 2) -> str:
    launches = kernels(path)
    per_call = launches[len(launches) - len(launches) // calls :]  # the last call's launches
    lines = [
        f"{path.stem.removeprefix('ncu_')} bf16, one fwd+bwd call, {len(per_call)} kernels",
        "",
        "| kernel | grid | block | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for launch in per_call:
        cells = []
        for title, key in COLUMNS.items():
            value = launch.get(key, "")
            if title == "us" and value:
                value = f"{number(value) / 1000:.1f}"
            if title.startswith("occupancy") and value:
                theory = launch.get(("Occupancy", "Theoretical Occupancy"), "")
                value = f"{number(value):.0f} ({number(theory):.0f})" if theory else value
            cells.append(value)
        lines.append(f"| {launch['name']} | {launch['grid']} | {launch['block']} | " + " | ".join(cells) + " |")
    total = sum(number(launch[COLUMNS["us"]]) for launch in per_call) / 1000
    lines += ["", f"sum of the kernels' durations: {total:.1f} us", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--calls", type=int, default=2, help="fwd+bwd calls the CSV profiled")
    args = parser.parse_args()
    for path in args.csv:
        print(table(path, args.calls))


if __name__ == "__main__":
    main()
