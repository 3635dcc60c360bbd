"""``tinyserve-eval compare``: the same tasks at the dense baseline and at each token budget.

    tinyserve-eval compare --model_args pretrained=PATH[,dtype=bfloat16,page_size=16,...] \\
        --tasks tinyserve_passkey_8k,tinyserve_code_ppl_4k --budgets dense,512,1024,2048,4096 \\
        [--limit N] [--output_path DIR] [--batch_size N] [--device cuda] [--metadata JSON]

The model is loaded once (``--model tinyserve``) and re-patched between budgets (every other
SparseConfig field stays as given in ``--model_args``). Written to ``--output_path`` (default
``tinyserve_compare/``):

* ``compare.json``: per budget lm-eval's results, the tinyserve summary (modes, context lengths,
  tokens/s, KV fraction read per task) and wall time; the table rows;
* ``compare.md``: the scores table (score per budget, drop vs dense, context lengths, mode) and the
  throughput table (tokens/s and fraction of the KV cache read per budget);
* ``compare.png``: score vs budget per task (main metric), and KV fraction read vs budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

from ..config import SparseConfig

# the metric a task is plotted by, in order of preference
MAIN_METRICS = ("exact_match", "acc", "score", "bits_per_byte", "acc_norm", "word_perplexity")
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


def parse_budgets(text: str, base: SparseConfig) -> list[int | None]:
    """``"dense,512,1024"`` -> ``[None, 512, 1024]`` (dense first, always present), each validated against
    the base config (a whole number of pages, room for the sink + recent pages)."""
    budgets: list[int | None] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            config = SparseConfig.from_kwargs(base, token_budget=item)
        except ValueError as err:
            raise ValueError(f"--budgets: {item!r}: {err}") from None
        if config.token_budget not in budgets:
            budgets.append(config.token_budget)
    if None in budgets:
        budgets.remove(None)
    return [None] + budgets


def budget_label(budget: int | None) -> str:
    return "dense" if budget is None else str(budget)


def _parse_kv(values: Sequence[str] | None) -> dict:
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    out: dict = {}
    for value in values or []:
        parsed = try_parse_json(value)
        out.update(parsed if isinstance(parsed, dict) else key_val_to_dict(value))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyserve-eval compare",
        description="Evaluate lm-eval tasks at the dense baseline and at each sparse token budget.",
    )
    p.add_argument("--model_args", "-a", nargs="+", required=True, help="key=val,key2=val2 (pretrained=... required)")
    p.add_argument("--tasks", "-t", nargs="+", required=True, help="task names or groups, comma or space separated")
    p.add_argument("--budgets", default="dense,512,1024,2048,4096", help="comma list; 'dense' is the baseline")
    p.add_argument("--limit", "-L", type=float, default=None, help="examples per task (count or fraction)")
    p.add_argument("--output_path", "-o", default="tinyserve_compare", help="directory for compare.{json,md,png}")
    p.add_argument("--batch_size", "-b", default="1")
    p.add_argument("--device", default=None, help="cuda, cuda:0, cpu, ... (default: cuda if available)")
    p.add_argument("--num_fewshot", "-f", type=int, default=None)
    p.add_argument("--gen_kwargs", nargs="+", default=None, help="key=val generation overrides")
    p.add_argument("--metadata", nargs="+", default=None, help="task metadata, JSON or key=val")
    p.add_argument("--include_path", default=None, help="another task directory")
    p.add_argument("--seed", type=int, default=0, help="python / numpy / torch / few-shot seed")
    p.add_argument("--no_plot", action="store_true", help="skip compare.png")
    p.add_argument("--no_warmup", action="store_true", help="skip the untimed warm-up before each budget")
    return p


def _metric_rows(results: dict) -> dict[tuple[str, str], float]:
    """``{(task, metric): value}`` of one lm-eval results dict (stderr, alias and -1 placeholders out)."""
    rows = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            if metric == "sample_len":
                continue
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            rows[(task, name)] = float(value)
    return rows


def _task_info(summary: dict, task: str) -> dict:
    """Context lengths, mode and throughput of one task from a TinyServeLM summary (request types merged)."""
    per_type = summary.get("tasks", {}).get(task, {})
    if not per_type:
        return {}
    mins = [s["context_tokens"]["min"] for s in per_type.values() if s["context_tokens"]["min"] is not None]
    maxs = [s["context_tokens"]["max"] for s in per_type.values() if s["context_tokens"]["max"] is not None]
    total_req = sum(s["requests"] for s in per_type.values())
    mean = None
    weights = [(s["context_tokens"]["mean"], len_) for s in per_type.values()
               if (len_ := s["requests"]) and s["context_tokens"]["mean"] is not None]
    if weights:
        mean = sum(m * w for m, w in weights) / max(1, sum(w for _, w in weights))
    tokens = sum(s["tokens"] for s in per_type.values())
    seconds = sum(s["seconds"] for s in per_type.values())
    read = [s["fraction_read"] for s in per_type.values() if s["fraction_read"] is not None]
    return {
        "mode": ", ".join(dict.fromkeys(s["mode"] for s in per_type.values())),
        "requests": total_req,
        "context_min": min(mins) if mins else None,
        "context_mean": mean,
        "context_max": max(maxs) if maxs else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "fraction_read": sum(read) / len(read) if read else None,
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_drop(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3e}" if abs(value) >= 1e5 else f"{value:+.4f}"


def build_tables(runs: list[dict]) -> tuple[list[dict], str]:
    """Rows (one per task and metric) and the markdown of both tables."""
    labels = [budget_label(r["budget"]) for r in runs]
    per_run = [_metric_rows(r["results"]) for r in runs]
    dense = per_run[0]
    keys = list(dense)
    for rows in per_run[1:]:
        keys += [k for k in rows if k not in keys]
    table_rows = []
    for task, metric in keys:
        values = [rows.get((task, metric)) for rows in per_run]
        if all(v is None or v == -1.0 for v in values):
            continue  # e.g. a depth no example of --limit reached
        info = _task_info(runs[0]["tinyserve"], task)
        base = values[0]
        drops = [None if (v is None or base is None) else v - base for v in values]
        table_rows.append({
            "task": task, "metric": metric, "scores": dict(zip(labels, values)),
            "drop_vs_dense": dict(zip(labels, drops)),
            "lower_is_better": any(s in metric for s in LOWER_IS_BETTER),
            "context_tokens": {k: info.get(f"context_{k}") for k in ("min", "mean", "max")},
            "mode": {lab: _task_info(r["tinyserve"], task).get("mode") for lab, r in zip(labels, runs)},
            "tokens_per_s": {lab: _task_info(r["tinyserve"], task).get("tokens_per_s") for lab, r in zip(labels, runs)},
            "fraction_read": {lab: _task_info(r["tinyserve"], task).get("fraction_read") for lab, r in zip(labels, runs)},
        })

    md = ["## Scores", ""]
    head = ["task", "metric", "context tokens (min / mean / max)", "mode"] + [
        lab if lab == "dense" else f"{lab} (Δ vs dense)" for lab in labels
    ]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table_rows:
        ctx = row["context_tokens"]
        ctx_text = "n/a" if ctx["min"] is None else f"{ctx['min']} / {ctx['mean']:.0f} / {ctx['max']}"
        mode = row["mode"].get(labels[-1]) or row["mode"].get("dense") or "n/a"
        cells = [row["task"], row["metric"], ctx_text, mode]
        for lab in labels:
            score, drop = row["scores"][lab], row["drop_vs_dense"][lab]
            cells.append(_fmt(score) if lab == "dense" else f"{_fmt(score)} ({_fmt_drop(drop)})")
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Δ: score minus the dense score (for perplexity / bits-per-byte lower is better).", ""]

    md += ["## Throughput", ""]
    head = ["task", "mode"] + [f"{lab} tok/s" for lab in labels] + [f"{lab} KV read" for lab in labels if lab != "dense"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for row in table_rows:
        if row["task"] in seen:
            continue
        seen.add(row["task"])
        cells = [row["task"], row["mode"].get(labels[-1]) or "n/a"]
        cells += [_fmt(row["tokens_per_s"][lab], 1) for lab in labels]
        cells += [_fmt(row["fraction_read"][lab], 3) for lab in labels if lab != "dense"]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "tok/s: tokens through the model (prefill + decode steps) per second of that task's requests; "
           "KV read: fraction of the valid KV cache the decode steps attended (all layers).", ""]
    return table_rows, "\n".join(md)


def _main_metric(rows: list[dict], task: str) -> dict | None:
    candidates = [r for r in rows if r["task"] == task]
    for name in MAIN_METRICS:
        for r in candidates:
            if r["metric"] == name:
                return r
    return candidates[0] if candidates else None


def plot(rows: list[dict], labels: list[str], path: Path) -> None:
    """Score (each task's main metric) and KV fraction read vs budget; budgets ascending, ``dense`` last,
    the dense score also drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [lab for lab in labels if lab != "dense"] + ["dense"]
    xs = list(range(len(order)))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, (ax_score, ax_read) = plt.subplots(1, 2, figsize=(12, 4.5))
    for task in tasks:
        row = _main_metric(rows, task)
        if row is None:
            continue
        ys = [row["scores"][lab] for lab in order]
        better = "lower" if row["lower_is_better"] else "higher"
        (line,) = ax_score.plot(xs, [math.nan if y is None else y for y in ys], marker="o",
                                label=f"{task}: {row['metric']} ({better} is better)")
        if row["scores"]["dense"] is not None:
            ax_score.axhline(row["scores"]["dense"], color=line.get_color(), linestyle="--", alpha=0.5)
        reads = [row["fraction_read"][lab] for lab in order]
        if any(r is not None for r in reads):
            ax_read.plot(xs, [math.nan if r is None else r for r in reads], marker="o", label=task)
    for ax, title in ((ax_score, "score vs token budget (dashed: dense)"),
                      (ax_read, "fraction of the KV cache read by decode steps")):
        ax.set_xticks(xs, order)
        ax.set_xlabel("token budget")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_read.set_ylim(0, 1.05)
    ax_score.legend(fontsize=7)
    if ax_read.get_legend_handles_labels()[0]:
        ax_read.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compare(args: argparse.Namespace) -> dict | None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable
    from tqdm import tqdm

    from . import TASKS_DIR
    from .lm_model import TinyServeLM, split_model_args

    model_args = _parse_kv(args.model_args)
    if "pretrained" not in model_args:
        raise ValueError("compare: --model_args needs pretrained=<model name or path>")
    _, sparse_kwargs, _ = split_model_args(model_args)  # unknown args fail here, before loading
    sparse_kwargs.pop("token_budget", None)
    budgets = parse_budgets(args.budgets, SparseConfig.from_kwargs(**sparse_kwargs))
    tasks = [t for item in args.tasks for t in item.split(",") if t]
    metadata = _parse_kv(args.metadata)
    gen_kwargs = _parse_kv(args.gen_kwargs) or None
    batch_size = args.batch_size if str(args.batch_size).startswith("auto") else int(args.batch_size)

    init_args = {k: v for k, v in model_args.items() if k != "token_budget"}
    init_args.update(batch_size=batch_size)
    if args.device:
        init_args["device"] = args.device
    lm = TinyServeLM(**init_args, token_budget=None)
    include = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    task_manager = TaskManager(include_path=include, metadata={**model_args, **metadata})

    runs = []
    for budget in tqdm(budgets, desc="budgets", disable=lm.rank != 0):
        config = lm.set_sparse_config(token_budget=budget)
        if not args.no_warmup:  # past the budget, so the sparse kernels run (and compile) here
            lm.warmup((budget or 0) + 4 * config.page_size)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, gen_kwargs=gen_kwargs,
            task_manager=task_manager, log_samples=False, bootstrap_iters=0, random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )
        wall = time.perf_counter() - start
        if results is None:  # a non-zero rank of a data-parallel run
            continue
        runs.append({
            "budget": budget,
            "config": lm.sparse_config.to_dict(),
            "wall_s": wall,
            "results": {k: results.get(k) for k in ("results", "groups", "n-samples", "versions") if k in results},
            "tinyserve": lm.tinyserve_summary(),
        })
    if not runs:
        return None

    out = Path(args.output_path)
    out.mkdir(parents=True, exist_ok=True)
    rows, markdown = build_tables(runs)
    labels = [budget_label(b) for b in budgets]
    title = (f"# tinyserve compare: {model_args['pretrained']}\n\n"
             f"tasks: {', '.join(tasks)}; budgets: {', '.join(labels)}; limit: {args.limit}; "
             f"config: {json.dumps({k: v for k, v in runs[0]['config'].items() if k != 'token_budget'})}; "
             f"score_mode: {runs[0]['tinyserve']['score_mode']}\n\n")
    report = {
        "model_args": model_args, "tasks": tasks, "budgets": labels, "limit": args.limit,
        "metadata": metadata, "runs": runs, "table": rows,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=handle_non_serializable))
    (out / "compare.md").write_text(title + markdown)
    if not args.no_plot:
        plot(rows, labels, out / "compare.png")
    print(title + markdown)
    print(f"[tinyserve compare] wrote {out / 'compare.json'}, {out / 'compare.md'}"
          + ("" if args.no_plot else f", {out / 'compare.png'}"))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from lm_eval.utils import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    run_compare(args)
    return 0
