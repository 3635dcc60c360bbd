#!/usr/bin/env python
"""Plots and a README-ready table from a bench_e2e.py JSON (runs on CPU).

    python benchmarks/plot_e2e.py benchmarks/results/e2e_h100.json                 # -> benchmarks/results/
    python benchmarks/plot_e2e.py benchmarks/results/e2e_h100*.json                # several runs merged
    python benchmarks/plot_e2e.py /tmp/e2e.json --outdir /tmp/plots

Several JSONs (e.g. ``--grid default``, ``models`` and ``sweep`` runs) are merged: rows are keyed by (model,
batch, context, mode, budget, prefill chunks, K/V and metadata dtypes, synthetic context), a measured row wins over a skipped one and a later file over an earlier one;
the header lists every run's device, versions and commit.

Writes, per model: ``e2e_decode_<model>.png`` (decode ms/step vs context, one panel per batch, one line per
method) and ``e2e_memory_<model>.png`` (peak GPU memory vs context), and ``e2e_table.md``: decode ms/step and
peak memory side by side per (model, batch, context), the targets' verdicts, and the full row table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ORDER = ["hf_dynamic", "hf_static", "ts_dense_eager", "ts_dense", "ts_sparse_eager", "ts_sparse", "ts_fused_eager", "ts_fused",
         "ts_split"]
SHORT = {
    "hf_dynamic": "HF dynamic",
    "hf_static": "HF static+compile",
    "ts_dense": "ts dense",
    "ts_dense_eager": "ts dense eager",
    "ts_sparse": "ts sparse",
    "ts_sparse_eager": "ts sparse eager",
    "ts_fused": "ts fused",
    "ts_fused_eager": "ts fused eager",
    "ts_split": "ts split",
}
STYLE = {
    "hf_dynamic": dict(color="tab:gray", linestyle="--", marker="x"),
    "hf_static": dict(color="black", linestyle="-", marker="s"),
    "ts_dense": dict(color="tab:blue", linestyle="-", marker="o"),
    "ts_dense_eager": dict(color="tab:blue", linestyle=":", marker="o"),
    "ts_sparse": dict(color="tab:red", linestyle="-", marker="^"),
    "ts_sparse_eager": dict(color="tab:red", linestyle=":", marker="^"),
    "ts_fused": dict(color="tab:green", linestyle="-", marker="v"),
    "ts_fused_eager": dict(color="tab:green", linestyle=":", marker="v"),
    "ts_split": dict(color="tab:purple", linestyle="-", marker="D"),
}


def method_key(row: dict) -> tuple[str, int | None, int | None, str, str, bool]:
    return (row["mode"], row.get("budget"), row.get("prefill_chunk"), row.get("kv_dtype", "auto"), row.get("meta_dtype", "auto"),
            bool(row.get("synthetic")))


def method_name(key) -> str:
    mode, budget, chunk, kv, meta, synthetic = key
    return (SHORT.get(mode, mode) + (f" {budget}" if budget else "") + (f" (chunks {chunk})" if chunk else "")
            + (f" [{kv} KV]" if kv != "auto" else "") + (f" [{meta} meta]" if meta != "auto" else "")
            + (" [synthetic context]" if synthetic else ""))


def sort_methods(keys):
    return sorted(keys, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1] or 0, k[2] or 0))


def fmt(x, nd):
    return "-" if x is None else f"{x:.{nd}f}"


def plot(data: dict, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["status"] == "ok"]
    written = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        batches = sorted({r["batch"] for r in mrows})
        for metric, ylabel, fname in (
            ("decode_ms", "decode ms / step (median)", "decode"),
            ("peak_gib", "peak GPU memory, GiB", "memory"),
        ):
            if all(r.get(metric) is None for r in mrows):
                continue
            fig, axes = plt.subplots(1, len(batches), figsize=(4.8 * len(batches), 4.0), squeeze=False)
            for ax, batch in zip(axes[0], batches):
                series = defaultdict(list)
                for r in mrows:
                    if r["batch"] == batch and r.get(metric) is not None:
                        series[method_key(r)].append((r["context"], r[metric]))
                for key in sort_methods(series):
                    pts = sorted(series[key])
                    xs, ys = zip(*pts)
                    style = dict(STYLE.get(key[0], {}))
                    if key[1] and key[1] != 2048:  # other budgets: lighter
                        style["alpha"] = 0.55
                    if key[2]:  # chunked prefill: dashed
                        style["linestyle"] = "--"
                    ax.plot(xs, ys, label=method_name(key), **style)
                ax.set_xscale("log", base=2)
                if metric == "decode_ms":
                    ax.set_yscale("log")
                ax.set_xlabel("context (tokens)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{model}, batch {batch}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(f"{data.get('device', '')}: {ylabel} vs context", fontsize=10)
            fig.tight_layout()
            path = outdir / f"e2e_{fname}_{model}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def table_markdown(data: dict) -> str:
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    v = data.get("versions", {})
    bw = data.get("copy_bandwidth_Bps")
    lines = [
        "# End-to-end decode: HF dense vs tinyserve",
        "",
        f"{data.get('device')}; torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}; "
        f"commit `{str(data.get('commit'))[:12]}`; {data.get('date')}; {data.get('dtype')} random-weight models; "
        f"{data.get('args', {}).get('new_tokens')} new tokens per run; copy bandwidth "
        f"{(bw or 0) / 1e12:.2f} TB/s. Generated by `benchmarks/bench_e2e.py`, tabulated by `benchmarks/plot_e2e.py`.",
        "",
        "Decode ms/step is the median step of one generate() (CUDA events per token); tok/s = batch / step time; "
        "peak = torch.cuda.max_memory_allocated over the whole generate() (prefill included); "
        "floor = (weights + KV bytes a step must read) / copy bandwidth.",
        "",
    ]
    if data.get("runs"):
        lines += ["Runs merged here:", ""] + [
            f"- grid `{r.get('grid')}`: {r.get('device')}, torch {(r.get('versions') or {}).get('torch')}, commit "
            f"`{str(r.get('commit'))[:12]}`, {r.get('date')}" for r in data["runs"]
        ] + [""]
    methods = sort_methods({method_key(r) for r in rows})
    shapes = sorted({(r["model"], r["batch"], r["context"]) for r in rows}, key=lambda s: (s[0], s[1], s[2]))
    by = {(r["model"], r["batch"], r["context"], *method_key(r)): r for r in rows}
    for title, cell in (
        ("Decode ms/step (tokens/s)", lambda r: f"{r['decode_ms']:.2f} ({r['tokens_per_s']:.0f})"),
        ("Peak GPU memory, GiB", lambda r: fmt(r.get("peak_gib"), 2)),
    ):
        used = [m for m in methods if any((s + m) in by for s in shapes)]
        lines += [f"## {title}", "", "| model | B | context | " + " | ".join(method_name(m) for m in used) + " |",
                  "|---|---|---|" + "---|" * len(used)]
        for s in shapes:
            cells = [cell(by[s + m]) if (s + m) in by else "" for m in used]
            lines.append(f"| {s[0]} | {s[1]} | {s[2]} | " + " | ".join(cells) + " |")
        lines.append("")
    if data.get("targets"):
        lines += ["## Targets", ""] + [f"- **{t['verdict']}** {t['target']}: {t['detail']}" for t in data["targets"]] + [""]
    lines += [
        "## All rows",
        "",
        "| model | B | context | method | prefill ms | decode ms/step | tok/s | peak GiB | floor ms | x floor | KV read | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        note = r["status"] if r["status"] != "ok" else ""
        if r.get("reason"):
            note = (note + ": " if note else "") + str(r["reason"])
        note = note.replace("|", "/")[:140]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['context']} | {method_name(method_key(r))} | {fmt(r.get('prefill_ms'), 1)} "
            f"| {fmt(r.get('decode_ms'), 3)} | {fmt(r.get('tokens_per_s'), 1)} | {fmt(r.get('peak_gib'), 2)} "
            f"| {fmt(r.get('floor_ms'), 3)} | {fmt(r.get('x_floor'), 1)} | {fmt(r.get('fraction_read'), 3)} | {note} |"
        )
    return "\n".join(lines) + "\n"


def merge(runs: list[dict]) -> dict:
    """One data dict from several runs (see the module docstring)."""
    if len(runs) == 1:
        return runs[0]
    rows: dict[tuple, dict] = {}
    for run in runs:
        for r in run["rows"]:
            key = (r["model"], r["batch"], r["context"], *method_key(r))
            if r["status"] == "ok" or key not in rows or rows[key]["status"] != "ok":
                rows[key] = r
    merged = dict(runs[-1])
    merged["rows"] = list(rows.values())
    merged["targets"] = [t for run in runs for t in run.get("targets", []) if t["verdict"] != "N/A"]
    merged["runs"] = [
        {k: run.get(k) for k in ("device", "versions", "commit", "date", "copy_bandwidth_Bps")} | {"grid": run.get("args", {}).get("grid")}
        for run in runs
    ]
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="bench_e2e.py output(s)")
    p.add_argument("--outdir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    data = merge([json.loads(Path(path).read_text()) for path in args.json])
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = plot(data, outdir)
    table = outdir / "e2e_table.md"
    table.write_text(table_markdown(data))
    for path in [*written, table]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
