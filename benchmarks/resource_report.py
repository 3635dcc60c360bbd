"""Offline resource report of the decode-chain kernels for an sm_90 (H100) target: no GPU needed.

    python benchmarks/resource_report.py [--model llama3-8b] [--batch 8] [--tokens 65536] [--budget 2048]

Each launcher (score, select, attention) is called on ``meta`` tensors of the shape; its Triton launch is
intercepted and the very kernel, arguments and launch options it would run are compiled for
``GPUTarget("cuda", 90, 32)`` with the JIT's own argument specialization (integers equal to 1 become
constants, multiples of 16 are marked divisible by 16, tensors 16-byte aligned), using the ``ptxas`` that
ships with Triton. Printed per kernel: registers per thread, shared memory, resident CTAs per SM (H100
limits: 64K registers, 227 KB shared, 2048 threads, 32 CTAs), grid, and the SASS instruction mix that
matters for a memory-bound kernel (16-byte vs narrower global loads, ``cp.async`` (LDGSTS), tensor-core
ops, barriers, warp shuffles). What the METHOD calls "read what costs no device time": e.g. whether a
gather is issued as 16-byte ``cp.async`` and pipelined, or how many barriers a selection pass costs.

The local Triton may be newer than the device's (3.9 here, 3.6 on the lent H100), so the counts are
indicative of the device's code, not identical to it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target: before Triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"tinyllama": (32, 4, 64), "llama3-8b": (32, 8, 128)}  # q heads, kv heads, head_dim
PAGE = 16
H100 = dict(regs=65536, smem=227 * 1024, threads=2048, ctas=32)
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8", torch.bool: "i1"}
SASS_OPS = {
    "ldg_128": r"\bLDG\.E\.128\b", "ldg_64": r"\bLDG\.E\.64\b", "ldg_narrow": r"\bLDG\.E(\.(U8|S8|U16|S16))?\s",
    "ldgsts": r"\bLDGSTS\b", "hmma": r"\bHMMA\b", "hgmma": r"\bHGMMA\b", "bar_sync": r"\bBAR\.SYNC\b",
    "shfl": r"\bSHFL\b", "redux": r"\bREDUX\b", "stg": r"\bSTG\b",
    "ublkpf": r"\bUBLKPF\b",  # bulk L2 prefetches (the score's metadata and query, before its PDL wait)
    "utmaldg": r"\bUTMALDG\b",  # tensor-memory-accelerator copies (the score's metadata read through a descriptor)
    "f2f": r"\bF2F\.",  # scalar conversions (16 per clock per SM): none per value when fp8 data is upcast to fp16
}


class _Captured(Exception):
    pass


def capture_launch(kernel, launcher, skip=(), nth: int = 0) -> dict:
    """Run ``launcher()`` (a call into one of the ``triton_*`` launchers on meta tensors) and return the
    ``nth`` (from 0) launch of ``kernel`` it makes, as ``{"args": {name: value}, "options": {...}, "grid": ...}``,
    without running it; launches of the kernels in ``skip`` and the earlier ones of ``kernel`` (made before
    it) are dropped."""
    seen = {}
    earlier = [0]

    def run(*args, grid, warmup, **kwargs):
        if earlier[0] < nth:
            earlier[0] += 1
            return None
        names = [p.name for p in kernel.params]
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in ("num_warps", "num_stages", "launch_pdl", "num_ctas", "maxnreg")}
        bound.update(kwargs)
        seen.update(args=bound, options=options, grid=grid)
        raise _Captured

    originals = {k: k.run for k in (kernel, *skip)}
    for k in skip:
        k.run = lambda *args, **kwargs: None
    kernel.run = run
    try:
        launcher()
    except _Captured:
        pass
    finally:
        for k, original in originals.items():
            k.run = original
    if not seen:
        raise RuntimeError(f"{kernel.fn.__name__} was not launched")
    return seen


def specialize(kernel, args: dict, pdl: bool = True):
    """``(signature, constexprs, attrs)`` of ``args`` as Triton's JIT would specialize them for a launch
    (with ``pdl``: ``PDL`` on, as on a Hopper device)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = pdl if p.name == "PDL" else v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + TRITON_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[p.name] = "constexpr"
                constexprs[p.name] = 1
            else:
                signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":  # a host-side TMA descriptor (triton_score.meta_descriptor)
            signature[p.name] = f"tensordesc<{TRITON_TYPES[v.base.dtype]}{list(v.block_shape)}>"
        else:
            raise TypeError(f"{p.name}: {type(v)}")
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def report(name: str, kernel, launch: dict) -> dict:
    """Compile one captured launch for sm_90 and summarise its resources and SASS."""
    signature, constexprs, attrs = specialize(kernel, launch["args"])
    options = {k: v for k, v in launch["options"].items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    smem = int(compiled.metadata.shared)
    threads = 32 * options.get("num_warps", 4)
    per_sm = min(H100["ctas"], H100["threads"] // threads, H100["regs"] // max(1, regs * threads),
                 H100["smem"] // smem if smem else H100["ctas"])
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    mix = {k: sum(1 for line in lines if re.search(rx, line)) for k, rx in SASS_OPS.items()}
    # the bulk prefetches placed before the PDL wait (ACQBULK), where they overlap the previous grid
    cut = next((i for i, line in enumerate(lines) if re.search(r"\bACQBULK\b", line)), len(lines))
    mix["ublkpf_before_wait"] = sum(1 for line in lines[:cut] if re.search(SASS_OPS["ublkpf"], line))
    grid = launch["grid"]
    ctas = 1
    for g in (grid if isinstance(grid, tuple) else (grid,)):
        ctas *= g
    return dict(kernel=name, grid=list(grid) if isinstance(grid, tuple) else [grid], ctas=ctas, **options,
                regs=regs, local_bytes=spill, smem_bytes=smem, ctas_per_sm=per_sm, sass_instructions=len(lines), **mix)


def chain_launches(model: str, batch: int, tokens: int, budget: int) -> list[tuple[str, object, dict]]:
    """The score -> select -> attention (+ merge, when the attention splits) launches of one decode step of
    one layer and the selection with the narrowing search (``ways=0``) and ranking its last 64 keys
    (``finish=64``), then the same three in
    the row-chained mode (``ops/triton_chain.py``), the fused score + select kernel of its fused mode (with
    its register cap), the persistent decode (``ops/triton_persistent.py``, one grid and two), then the score over fp8 page metadata and the attention
    over an fp8 K/V cache (``page_meta_dtype`` / ``kv_cache_dtype="fp8_e4m3"``), and the score and the fused score +
    select reading their metadata through the TMA (``tma=True``), captured on meta tensors, the score launchers
    seeing a PDL device (so their L2 prefetch plan is the device's). The other score rows show the ``cp.async``
    read: on a CUDA device a score launch of ``triton_score.TMA_MIN_LAUNCH_BYTES`` or more takes the TMA row's."""
    from tinyserve_patch.ops import triton_fused_select, triton_score

    with mock.patch.object(triton_score, "use_pdl", lambda device: True), \
            mock.patch.object(triton_fused_select, "use_pdl", lambda device: True), \
            mock.patch.object(triton_score, "tma_supported", lambda meta, block_d: meta.shape[-1] == block_d <= 128):
        return _chain_launches(model, batch, tokens, budget)


def _chain_launches(model: str, batch: int, tokens: int, budget: int) -> list[tuple[str, object, dict]]:
    """:func:`chain_launches`, with the score launchers seeing a PDL device (their L2 prefetch plan)."""
    from tinyserve_patch.ops import triton_chain, triton_decode, triton_fused_select, triton_persistent, triton_score, triton_select

    chained = (triton_score._score_kernel, triton_select._select_kernel, triton_decode._decode_split_kernel)
    hq, hkv, d = MODELS[model]
    dev, bf = torch.device("meta"), torch.bfloat16
    q = torch.empty(batch, hq, d, dtype=bf, device=dev)
    meta = torch.empty(batch, hkv, tokens // PAGE, 2, d, dtype=bf, device=dev)
    k = torch.empty(batch, hkv, tokens, d, dtype=bf, device=dev)
    meta8 = torch.empty(meta.shape, dtype=torch.float8_e4m3fn, device=dev)
    # a launch too large to prefetch its walks before the wait: only their heads (triton_score.prefetch_plan)
    big_pages = max(tokens // PAGE, 4 * triton_score.PREFETCH_MAX_LAUNCH_BYTES // (batch * hkv * 2 * d * 2))
    meta_big = torch.empty(batch, hkv, big_pages, 2, d, dtype=bf, device=dev)
    k8 = torch.empty(k.shape, dtype=torch.float8_e4m3fn, device=dev)
    start = torch.empty(batch, dtype=torch.int32, device=dev)
    end = torch.empty(batch, dtype=torch.int32, device=dev)
    scores = torch.empty(batch, hkv, tokens // PAGE, dtype=torch.float32, device=dev)
    idx = torch.empty(batch, hkv, budget // PAGE, dtype=torch.int32, device=dev)
    return [
        ("score", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta, start, end, PAGE, "max"))),
        ("select", triton_select._select_kernel,
         capture_launch(triton_select._select_kernel,
                        lambda: triton_select.select_pages_triton(scores, start, end, PAGE, budget // PAGE, 1, 1))),
        ("attention", triton_decode._decode_split_kernel,
         capture_launch(triton_decode._decode_split_kernel,
                        lambda: triton_decode.sparse_decode_attention_triton(q, k, k, idx, start, end, PAGE, d**-0.5))),
        ("merge", triton_decode._decode_merge_kernel,
         capture_launch(triton_decode._decode_merge_kernel,
                        lambda: triton_decode.sparse_decode_attention_triton(q, k, k, idx, start, end, PAGE, d**-0.5),
                        skip=(triton_decode._decode_split_kernel,))),
        ("select (narrowing search)", triton_select._select_kernel,
         capture_launch(triton_select._select_kernel,
                        lambda: triton_select.select_pages_triton(scores, start, end, PAGE, budget // PAGE, 1, 1, ways=0))),
        ("select (ranking the last 64 keys)", triton_select._select_kernel,
         capture_launch(triton_select._select_kernel,
                        lambda: triton_select.select_pages_triton(scores, start, end, PAGE, budget // PAGE, 1, 1, finish=64))),
    ] + [
        (f"{name} (chained)", kernel, capture_launch(kernel, lambda: triton_chain.quest_decode_chained_triton(
            q, k, k, meta, start, end, PAGE, budget // PAGE, 1, 1, "max", d**-0.5), skip=chained[:i]))
        for i, (name, kernel) in enumerate(zip(("score", "select", "attention"), chained))
    ] + [
        ("score + select (fused chain)", triton_fused_select._fused_kernel,
         capture_launch(triton_fused_select._fused_kernel, lambda: triton_chain.quest_decode_chained_triton(
             q, k, k, meta, start, end, PAGE, budget // PAGE, 1, 1, "max", d**-0.5, fused=True))),
        ("persistent decode", triton_persistent._persistent_kernel,
         capture_launch(triton_persistent._persistent_kernel, lambda: triton_persistent.quest_decode_persistent_triton(
             q, k, k, meta, start, end, PAGE, budget // PAGE, 1, 1, "max", d**-0.5))),
        *[(f"persistent decode, two grids: {grid}", triton_persistent._persistent_kernel,
           capture_launch(triton_persistent._persistent_kernel, lambda: triton_persistent.quest_decode_persistent_triton(
               q, k, k, meta, start, end, PAGE, budget // PAGE, 1, 1, "max", d**-0.5, grids=2), nth=nth))
          for nth, grid in enumerate(("score", "attention"))],
        ("score (fp8 metadata)", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta8, start, end, PAGE, "max"))),
        ("score (over 8 MiB of metadata)", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta_big, start, end, PAGE, "max"))),
        ("score (TMA read, one block a program)", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta, start, end, PAGE, "max", tma=True))),
        ("score (pages-major products)", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta, start, end, PAGE, "max", pages_major=True))),
        ("score (pages-major products, fp8 metadata)", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta8, start, end, PAGE, "max", pages_major=True))),
        ("score (pages-major products, TMA read)", triton_score._score_kernel,
         capture_launch(triton_score._score_kernel, lambda: triton_score.page_scores_triton(q, meta, start, end, PAGE, "max", tma=True,
                                                                                               pages_major=True))),
        ("score + select (fused chain, TMA read)", triton_fused_select._fused_kernel,
         capture_launch(triton_fused_select._fused_kernel, lambda: triton_chain.quest_decode_chained_triton(
             q, k, k, meta, start, end, PAGE, budget // PAGE, 1, 1, "max", d**-0.5, fused=True, fused_options={"tma": True}))),
        ("score + select (fused chain, pages-major products)", triton_fused_select._fused_kernel,
         capture_launch(triton_fused_select._fused_kernel, lambda: triton_chain.quest_decode_chained_triton(
             q, k, k, meta, start, end, PAGE, budget // PAGE, 1, 1, "max", d**-0.5, fused=True, fused_options={"pages_major": True}))),
        ("attention (fp8 K/V)", triton_decode._decode_split_kernel,
         capture_launch(triton_decode._decode_split_kernel,
                        lambda: triton_decode.sparse_decode_attention_triton(q, k8, k8, idx, start, end, PAGE, d**-0.5))),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = [report(name, kernel, launch) for name, kernel, launch in chain_launches(args.model, args.batch, args.tokens, args.budget)]
    print(f"{args.model} B={args.batch} {args.tokens} tokens, budget {args.budget}; sm_90, triton {triton.__version__}")
    cols = ["kernel", "ctas", "num_warps", "num_stages", "regs", "local_bytes", "smem_bytes", "ctas_per_sm", "sass_instructions",
            "ldg_128", "ldg_64", "ldg_narrow", "ldgsts", "utmaldg", "hmma", "hgmma", "bar_sync", "shfl", "redux", "ublkpf", "f2f"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), triton=triton.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
