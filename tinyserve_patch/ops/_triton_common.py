"""Shared pieces of the Triton kernels: launch-side checks, the tensor-core product helper, page
validity, and the exact top-k page selection used by ``triton_select`` and ``triton_fused_select``.

Selection semantics (identical to :func:`reference.select_pages`): per (row, KV head), the ``P`` pages are
ranked by ``+inf`` for forced (sink / recent) pages, ``-inf`` for invalid pages, the score made finite
otherwise (NaN and ``-inf`` -> the lowest finite float32, ``+inf`` -> the largest), so a forced page
always outranks a scored one and a valid page an invalid one;
the first ``k = min(num_select, valid pages)`` pages of a *stable* descending sort are kept (ties go to
the lower page number) and written in ascending page order, ``-1`` padded.

On the device this is an exact top-k without sorting: the float32 ranks are mapped to order-preserving
int32 keys, a threshold ``t`` at the ``k``-th largest key is found by a search on ``count(key >= t)``
within the scored pages' key range (1-4 thresholds per pass, their counts packed in one reduction) that
stops once a count is exactly ``k`` (~log(P) + a few passes rather than 32), then every page with
``key > t`` and the first ``k - count(key > t)`` pages with ``key == t`` (in index order) are kept and
compacted, both by one prefix sum of the packed pair (key > t, key == t).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import FP8_DTYPES

#: Largest number of pages a selection kernel holds in one program (``BLOCK = next_pow2(P)``).
MAX_SELECT_PAGES = 16384
INT32_MAX = 2147483647


def interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``) is on."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def f32_dot(dtype: torch.dtype) -> bool:
    """Whether ``mm`` must run in IEEE fp32: for fp32 data (no TF32 rounding), and under the interpreter,
    whose ``tl.dot`` mishandles bfloat16 operands (fp16/bf16 products are exact in fp32 either way)."""
    return dtype == torch.float32 or interpreting()


def scaled_f16(q_dtype: torch.dtype, data_dtype: torch.dtype) -> bool:
    """Whether a kernel multiplies ``data_dtype`` data by a ``q_dtype`` query in fp16 on a power-of-two-scaled
    query (:func:`scaled_f16_query`): fp8 data against a bfloat16 query."""
    return data_dtype in FP8_DTYPES and q_dtype == torch.bfloat16


_PROPS: dict = {}


def _cuda_props(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device``, cached per device index."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        _PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS[idx]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132, an H100's, for the CPU interpreter)."""
    return _cuda_props(device).multi_processor_count if device.type == "cuda" else 132


def use_pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch (PDL): on an NVIDIA CUDA device of compute capability >= 9
    (Hopper and later; never on ROCm, whose devices report their gfx major there), not under the
    interpreter, unless ``TINYSERVE_PDL=0``. A PDL launch may start while the previous kernel on the stream
    drains; every kernel here then waits for it (:func:`pdl_enter`) before its first global load or store
    (the score's L2 prefetch, :func:`prefetch_l2`, returns no data and comes before), so results are the
    same either way and only the launch latency between dependent kernels is hidden (CUDA graphs included)."""
    if device.type != "cuda" or interpreting() or os.environ.get("TINYSERVE_PDL", "1") == "0" or torch.version.hip:
        return False
    return _cuda_props(device).major >= 9


_TICKETS: dict = {}
_RETIRED: list = []  # buffers a pool outgrew: CUDA graphs captured on them may still replay, so they stay allocated


def ticket_counters(device: torch.device, n: int, pool: str = "tickets") -> torch.Tensor | None:
    """A persistent zeroed int32 buffer of at least ``n`` counters on ``device`` (one buffer per ``pool``)
    for the kernels that count programs through the memory (``"tickets"``: the "last program finishes the
    row" kernels, fused selection and inline merge; ``"chain"``: the row-chained decode,
    :mod:`triton_chain`), each of which leaves its counters zeroed again; None when the buffer would have to
    be allocated during CUDA-graph capture (a buffer first allocated then lives in the graph's pool, which
    CUDA-graph trees reject): the caller then falls back (the fused selection to a zeroed buffer of its own,
    the inline merge to the merge kernel, the chained decode to the split kernels). A cudagraph-trees
    warm-up run is not a capture and would allocate into the graph's pool: :func:`reserve_ticket_counters`
    allocates every pool ahead. One decode stream per device at a time: concurrent launches would share it."""
    key = (device, pool)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _TICKETS[key] = buf
    return buf


#: Counters of each pool for a decode step over ``rows`` (batch x KV heads) rows: ``fixed + per_row * rows``.
COUNTER_POOLS = {"tickets": (0, 1), "chain": (0, 3), "persistent": (3, 3)}


def reserve_ticket_counters(device: torch.device, rows: int) -> None:
    """Allocate every pool of :func:`ticket_counters` for decode steps of up to ``rows`` rows now, so that no
    kernel launch allocates one later. A first allocation inside CUDA-graph capture is refused (the
    launchers fall back), but one in a cudagraph-trees warm-up run (``torch.compile(mode="reduce-overhead")``,
    ``generate()``'s auto-compile) cannot be told apart from an eager call: it would land in the graph's
    private memory pool, which the trees then reject ("tensors in the cudagraph pool not tracked as
    outputs"). Call it eagerly (:class:`~tinyserve_patch.cache.TinyServeLayer` does when it allocates)."""
    for pool, (fixed, per_row) in COUNTER_POOLS.items():
        ticket_counters(device, fixed + per_row * rows, pool)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


#: The compute dtypes of the kernels (fp8 only as storage of K/V or page metadata).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{name} dtype {t.dtype} unsupported: fp16/bf16/fp32")


def check_head_dim(d: int) -> None:
    check(1 <= d <= 256, f"head_dim {d} unsupported: the Triton kernels take 1 <= head_dim <= 256")


def check_page_size(page_size: int) -> None:
    check(
        page_size in (8, 16, 32, 64, 128),
        f"page_size {page_size} unsupported: the Triton kernels take a power of two in 8..128",
    )


def check_rows(seq_start: torch.Tensor, seq_end: torch.Tensor, batch: int) -> None:
    for name, t in (("seq_start", seq_start), ("seq_end", seq_end)):
        check(t.dtype in (torch.int32, torch.int64) and t.numel() == batch, f"{name} must be an int tensor of {batch} elements")


def check_select_pages(pages: int) -> int:
    """``BLOCK`` of a selection program for ``pages`` pages (error above :data:`MAX_SELECT_PAGES`)."""
    check(pages >= 1, "no pages to select from")
    check(
        pages <= MAX_SELECT_PAGES,
        f"{pages} pages per row exceed the selection kernel's limit of {MAX_SELECT_PAGES} "
        f"(capacity / page_size); use a larger page_size",
    )
    return max(16, triton.next_power_of_2(pages))


def select_num_warps(block: int) -> int:
    """Warps of a selection program (H100: 4 best up to ~2K pages, 8 above; 16 is slower)."""
    return 4 if block <= 2048 else 8


# order-preserving int32 keys of +-inf (see finite_key); finite scores lie strictly between
KEY_POS_INF = tl.constexpr(0x7F800000)
KEY_NEG_INF = tl.constexpr(-2139095041)  # 0xFF800000 ^ 0x7FFFFFFF


def check_ways(ways: int) -> int:
    """``ways`` (thresholds per search pass of :func:`kth_largest_key`) validated: 1..4 (counts packed 16
    bits each in one int32 / int64 reduction) or 0 (the narrowing search: 2, then 3, then 4)."""
    check(ways in (0, 1, 2, 3, 4), f"ways={ways}: the selection search takes 1..4 thresholds per pass (0: 2 -> 4 as the bracket empties)")
    return ways


#: Thresholds per search pass of a selection program, stand-alone and fused: 2 (a ternary search). H100
#: sweeps (``tune_decode.py --kernels select``): 2026-11-23 morning, ternary best up to 2048 pages and binary
#: at 4096 (9.0 vs 9.8 us); the evening re-run (``tune_decode_h100_hist.json``) ternary best or level at
#: every shape, 4096 pages included (Llama-3-8B B=8 / 64K 8.3 vs 8.8 us, TinyLlama B=1 / 64K 7.2 vs 8.3;
#: 8192 pages 12.9 vs 13.2). The same run rejected a histogram search (``log2(bins - 2)`` bits of the
#: k-th key per pass in one ``tl.histogram`` + suffix scan, 3-7 passes where the ternary search takes ~7-12
#: on distinct scores): fewer passes but heavier ones, slower at every shape (11.7 vs 8.3 us at 4096
#: pages, 5.0 vs 3.8 at 1024).
SELECT_WAYS = 2

#: Keys in the search's bracket at which it stops and ranks them directly (:func:`kth_largest_key`;
#: 0 = search to the end). See ``benchmarks/NOTES.md`` for the measurement behind the default.
SELECT_FINISH = 0


def check_finish(finish: int) -> int:
    """``finish`` (see :data:`SELECT_FINISH`) validated: 0 or a power of two from 16 to 128."""
    check(finish in (0, 16, 32, 64, 128), f"finish={finish}: 0 (search to the end) or 16 / 32 / 64 / 128 keys")
    return finish


# ---------------------------------------------------------------------------------------------- device


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of every kernel: with ``PDL`` (see :func:`use_pdl`), wait until the previous grid on
    the stream has completed and its writes are visible, then let the next PDL launch start scheduling
    (it only gets SMs this grid no longer needs: all of this grid's programs are resident by then).
    Triggering only as the programs exit measured slower at batch 1 (H100, TinyLlama B=1 / 16K chain
    12.2 -> 14.0 us) and within noise at batch 8 (``benchmarks/results/pdl_trigger_{start,exit}_h100.json``)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """First statement of a row-chained kernel (:mod:`triton_chain`): let the next PDL launch start
    scheduling, without waiting for the previous grid; its inputs from that grid are flagged per row
    (:func:`wait_row`), and everything older was complete before that grid's programs triggered."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def trace_mark(trace_ptr, field: tl.constexpr, TRACE: tl.constexpr):
    """With ``TRACE`` (a :class:`trace.KernelTrace` region ``[programs, 4]`` int64): store the global timer
    (ns) in this program's ``field`` (0 start, 1 inputs ready, 2 end), with its SM in field 3 at the
    start. Compiled out without ``TRACE``."""
    if TRACE:
        prog = tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * tl.num_programs(0)
        tl.store(trace_ptr + prog * 4 + field, tl.extra.cuda.globaltimer())
        if field == 0:
            tl.store(trace_ptr + prog * 4 + 3, tl.extra.cuda.smid().to(tl.int64))


@triton.jit
def signal_row(counter_ptr, amount):
    """After a program's stores: make them visible and add ``amount`` (what they covered) to
    ``counter_ptr`` (the CTA barrier orders every thread's stores before the one release add at GPU scope)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, amount, sem="release", scope="gpu")


@triton.jit
def wait_row(counter_ptr, target):
    """Spin until ``counter_ptr`` reaches ``target`` (acquire: the counted programs' stores are visible
    after it; read them with ``cache_modifier=".cg"``, past a possibly stale L1); returns the value seen."""
    n = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while n < target:
        n = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    return n


@triton.jit
def scaled_f16_query(q, dtype: tl.constexpr = tl.float16):
    """``(q * 2^k in dtype, 2^-k)`` for a query tile whose largest ``|q|`` (finite, nonzero) lands in
    ``[2^14, 2^15)``: a bfloat16 q is then exact in float16 (only elements below ``2^-38`` of the largest
    round), so its products with fp8 data upcast to float16 — exact, and one conversion instruction per
    2 values on sm_90 where fp8 -> bfloat16 takes 3 — are the bfloat16 products times ``2^k``, and the
    fp32 sums of them times ``2^-k`` are the unscaled sums exactly. ``k`` is clamped to +-126 (zero,
    subnormal, inf or NaN maxima). One reduction over the tile per program."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(qf), axis=1), axis=0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent (-127: zero / subnormal)
    k = tl.minimum(tl.maximum(14 - e, -126), 126)
    scaled = qf * ((k + 127) << 23).to(tl.float32, bitcast=True)
    return scaled.to(dtype), ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, acc, F32: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; ``F32``: both operands as IEEE fp32 (see :func:`f32_dot`)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def round_to_fp8_e4m3(x):
    """float32 ``x`` saturated to +-448 and rounded to nearest-even on the float8_e4m3fn grid, still as
    float32 (then ``.to(float8)`` is exact): 3 mantissa bits for normals (integer rounding of the bits,
    the carry into the exponent included), steps of 2^-9 below 2^-6 (subnormals). The same values as
    ``x.clamp(-448, 448).to(torch.float8_e4m3fn)``; rounding here rather than in the cast keeps the
    CPU interpreter, whose fp8 cast drops the carry (1.97 -> 1.0), exact too."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    sub = (x + 24576.0) - 24576.0  # fp32 spacing at 2^14 is 2^-9: the add rounds to that grid
    sub = tl.where(sub == 0.0, x * 0.0, sub)  # the sign of a zero
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def round_to_fp8_e4m3_directed(x, UP: tl.constexpr):
    """float32 ``x`` saturated to +-448 and rounded toward +inf (``UP``) or -inf on the float8_e4m3fn grid,
    returned as float8_e4m3fn: the bits of :func:`reference.fp8_round_directed` (either zero -> +0.0),
    by the same steps: nearest (:func:`round_to_fp8_e4m3`), then one step on the fp8 bit pattern where
    that went the wrong way (toward zero from a value of the other sign, off zero to +-2^-9)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    x = tl.where(x == 0.0, 0.0, x)
    r = round_to_fp8_e4m3(x)  # float32 on the grid
    bits = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    positive = (bits & 0x80) == 0
    nonzero = (bits & 0x7F) != 0
    if UP:
        wrong = r < x
        stepped = tl.where(~positive & nonzero, bits - 1, tl.where(nonzero, bits + 1, 0x01))
    else:
        wrong = r > x
        stepped = tl.where(positive & nonzero, bits - 1, tl.where(nonzero, bits + 1, 0x81))
    return tl.where(wrong, stepped, bits).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def page_valid(pages, start, end, page_size):
    """Bool mask: page ``pages`` holds a token of ``[start, end)`` (int32 scalars)."""
    first = pages * page_size
    return (first < end) & (first + page_size > start) & (end > start)


@triton.jit
def finite_key(x):
    """float32 -> int32 keys in the order of ``x`` made finite first, as the reference ranks scores: NaN and
    ``-inf`` as the lowest finite float, ``+inf`` as the largest, ``-0.0`` tied with ``0.0``; every key lies
    strictly between ``KEY_NEG_INF`` and ``KEY_POS_INF``. Integer operations on the bit pattern only (the
    float clamp, NaN test and zero fold they replace cost ~10 instructions a key on sm_90)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats' magnitude bits flipped: the float order
    # +-inf -> +-largest finite; a NaN lies beyond the infinities: a negative one is clamped up with -inf,
    # a positive one is sent down
    key = tl.where(key > KEY_POS_INF, KEY_NEG_INF + 1, tl.minimum(tl.maximum(key, KEY_NEG_INF + 1), KEY_POS_INF - 1))
    return tl.where(key == -1, 0, key)  # -0.0, the only key -1, ties +0.0


@triton.jit
def _min_max(a_min, a_max, b_min, b_max):
    return tl.minimum(a_min, b_min), tl.maximum(a_max, b_max)


@triton.jit
def _search_passes(key, k, lo, hi, above, n_lo, base, found, LIMIT, WAYS: tl.constexpr, BITS: tl.constexpr):
    """Passes of :func:`kth_largest_key` with ``WAYS`` thresholds, while the bracket ``[lo, hi]`` (int32) is
    open and holds more than ``LIMIT`` keys (``n_lo - above``: ``n_lo`` keys ``>= lo``, ``above`` keys
    ``> hi``). Each threshold's count of keys ``>= c``, less ``base``, is packed in a ``BITS``-bit field of
    one int32 / int64 reduction: the caller guarantees those counts stay below ``2^BITS``.

    The thresholds are ``lo`` plus offsets in uint32 (the bracket's width ``hi - lo`` can exceed int32 but
    not uint32, and ``lo + offset <= hi`` is exact once wrapped back to int32), so a pass costs no 64-bit
    arithmetic: with int64 bounds the step's division alone was ~25 dependent instructions a pass and the
    update twice its width, on the path of every pass (sm_90 SASS, Triton 3.6: ~175 -> 134 instructions a
    pass). Same-run A/B on the H200 (``benchmarks/results/kernels_h200_int32search_*``): the selection
    0.39-0.87 us faster at all 12 shapes (TinyLlama B=1 / 64K 6.80 -> 6.29 us), the default chains 7.2 us
    faster over them. ``lo - 1`` never wraps: a bracket's ``lo`` is a finite score's key, above
    ``KEY_NEG_INF``."""
    PACK: tl.constexpr = tl.int32 if WAYS * BITS <= 32 else tl.int64
    MASK: tl.constexpr = (1 << BITS) - 1
    while (lo < hi) & (n_lo - above > LIMIT):
        lo_u = lo.to(tl.uint32, bitcast=True)
        width = hi.to(tl.uint32, bitcast=True) - lo_u  # hi - lo, exact in uint32
        step = width // (WAYS + 1) + 1  # ceil((width + 1) / (WAYS + 1)): 1 <= step <= width
        packed = tl.zeros_like(key).to(PACK)
        for i in tl.static_range(WAYS):
            c = (lo_u + tl.minimum(step * (i + 1), width)).to(tl.int32, bitcast=True)  # min(lo + (i+1) step, hi)
            packed += (key >= c).to(PACK) << (BITS * i)
        cnt = tl.sum(packed, axis=0)
        new_lo = lo
        new_hi = hi
        new_n_lo = n_lo
        hit = lo - 1  # no threshold counted exactly k
        for i in tl.static_range(WAYS):  # thresholds rise with i, so the counts fall
            c = (lo_u + tl.minimum(step * (i + 1), width)).to(tl.int32, bitcast=True)
            n = ((cnt >> (BITS * i)) & MASK).to(tl.int32) + base
            new_lo = tl.where(n >= k, c, new_lo)
            new_n_lo = tl.where(n >= k, n, new_n_lo)
            lower = (n < k) & (c - 1 < new_hi)  # the first (lowest) threshold counting fewer than k
            above = tl.where(lower, n, above)
            new_hi = tl.where(lower, c - 1, new_hi)
            hit = tl.where(n == k, c, hit)
        found = hit >= lo
        lo = tl.where(found, hit, new_lo)
        hi = tl.where(found, hit, new_hi)
        n_lo = tl.where(found, k, new_n_lo)
    return lo, hi, above, n_lo, found


@triton.jit
def _max_max(a_key, a_n, b_key, b_n):
    return tl.maximum(a_key, b_key), tl.maximum(a_n, b_n)


@triton.jit
def _rank_bracket(key, k, lo, hi, above, n_lo, scratch_ptr, FINISH: tl.constexpr):
    """The end of :func:`kth_largest_key` once its open bracket ``[lo, hi]`` holds ``n_lo - above <=
    FINISH`` keys: ``(t, count(key > t))`` for the ``k``-th largest key. The bracket's keys are compacted
    in index order (one scan) into ``FINISH`` int32 slots at ``scratch_ptr`` and read back as one tile;
    each is ranked against the others (``[FINISH, FINISH]`` compares, the counts above and equal packed in
    one reduction), and ``t`` is the one whose rank range holds ``k - above``."""
    inside = (key >= lo.to(tl.int32)) & (key <= hi.to(tl.int32))
    slot = tl.cumsum(inside.to(tl.int32), axis=0) - 1
    tl.store(scratch_ptr + slot, key, mask=inside)
    tl.debug_barrier()  # the stores of every thread before the tile is read back
    j = tl.arange(0, FINISH)
    real = j < n_lo - above
    cand = tl.load(scratch_ptr + j, mask=real, other=-2147483648)  # padding: below every key of the bracket
    above_eq = tl.where(cand[None, :] > cand[:, None], 1, 0) + tl.where((cand[None, :] == cand[:, None]) & real[None, :], 65536, 0)
    counts = tl.sum(above_eq, axis=1)  # [FINISH]: keys of the bracket above (low 16 bits) and equal to each
    n_above = counts & 0xFFFF
    n_equal = counts >> 16
    rank = k - above  # 1-based rank of the k-th largest key inside the bracket
    is_t = real & (n_above < rank) & (rank <= n_above + n_equal)
    t, n_gt = tl.reduce((tl.where(is_t, cand, -2147483648), tl.where(is_t, n_above, 0)), 0, _max_max)
    return t, above + n_gt


@triton.jit
def kth_largest_key(key, k, lo, hi, above, n_lo, scratch_ptr, scratch_len, WAYS: tl.constexpr, FINISH: tl.constexpr):
    """``(t, need)``: a threshold ``t`` such that the keys above ``t`` plus the first ``need`` keys equal to
    ``t`` (in index order) are exactly the ``k`` largest (``k >= 1``; the ``k``-th largest key lies in
    ``[lo, hi]``, int32 scalars, ``n_lo`` keys are ``>= lo`` (at least ``k``) and ``above`` keys are
    ``> hi``; keys outside that bracket are fine; at most 65535 keys are counted).

    A ``(WAYS + 1)``-ary search for the largest ``t`` with ``count(key >= t) >= k``: each pass splits
    ``[lo, hi]`` at ``WAYS`` thresholds and counts the keys at or above each in *one* reduction, the
    counts packed in 16-bit fields of an int32 (``WAYS <= 2``) or int64 (``WAYS <= 4``); it stops as soon
    as a count equals ``k`` (every key ``>= t`` is then kept: ``need = k`` covers all its ties). Otherwise
    the bracket closes on a key ``t`` and ``count(key > t)`` is the count last seen at ``hi + 1`` (or
    ``above``), so ``need = k - count(key > t)`` costs no further reduction. With ``lo``/``hi`` the score
    range this takes ~log_(WAYS+1)(pages) + a few passes instead of 32.

    ``FINISH > 0`` (``WAYS >= 1``): the passes stop once the bracket holds ``<= min(FINISH, scratch_len)``
    keys, which :func:`_rank_bracket` ranks directly through ``scratch_len`` int32 slots at
    ``scratch_ptr`` (the caller's output row, written again afterwards).

    ``WAYS == 0``, the narrowing search: 2 thresholds (16-bit counts) while the bracket holds over 1023
    keys, then 3 (10-bit fields) while it holds over 255, then 4 (8-bit fields), all in one int32. Before
    each narrower phase the keys above the bracket are set below every threshold (in a copy: the caller's
    keys are kept), so a count is the bracket's keys at or above the threshold plus ``above`` at that
    point, and fits the narrower field. Same result, fewer passes where the bracket empties slowly."""
    lo = lo.to(tl.int32)
    hi = hi.to(tl.int32)
    found = lo > hi  # (an empty bracket: the loop does not run)
    if WAYS == 0:
        lo, hi, above, n_lo, found = _search_passes(key, k, lo, hi, above, n_lo, 0, found, 1023, 2, 16)
        work = tl.where(key > hi.to(tl.int32), -2147483648, key)
        lo, hi, above, n_lo, found = _search_passes(work, k, lo, hi, above, n_lo, above, found, 255, 3, 10)
        work = tl.where(work > hi.to(tl.int32), -2147483648, work)
        lo, hi, above, n_lo, found = _search_passes(work, k, lo, hi, above, n_lo, above, found, 0, 4, 8)
    elif FINISH > 0:
        limit = tl.minimum(scratch_len, FINISH)
        lo, hi, above, n_lo, found = _search_passes(key, k, lo, hi, above, n_lo, 0, found, limit, WAYS, 16)
        if lo < hi:  # stopped with <= limit keys in the bracket: rank them
            t, n_gt = _rank_bracket(key, k, lo, hi, above, n_lo, scratch_ptr, FINISH)
            lo = t
            above = n_gt
    else:
        lo, hi, above, n_lo, found = _search_passes(key, k, lo, hi, above, n_lo, 0, found, 0, WAYS, 16)
    return lo.to(tl.int32), tl.where(found, k, k - above)


@triton.jit
def selection_keys(scores, offs, num_pages, start, end, num_select, page_size, sink, recent):
    """The ranking of :func:`select_from_scores`: ``(key, k, lo, hi, above, n_lo)``: int32 ``key`` per lane
    (``+inf`` key for forced pages, ``-inf`` for invalid ones, below every threshold for lanes
    ``>= num_pages``), ``k`` pages to keep, the bracket ``[lo, hi]`` of the ``k``-th largest key, the
    count of keys above ``hi`` and the count of keys ``>= lo``."""
    in_range = offs < num_pages
    # the row's pages as intervals (reference.page_valid_mask / forced_page_mask): valid [first, top],
    # scored (valid, not forced) [first + sink, min(last - recent, top)], so a lane costs four compares
    # and the counts need no reduction (with finite_key: ~30 -> ~14 instructions a lane; same-run A/B on
    # the H200, benchmarks/results/kernels_h200_intkeys_*: the selection up to 0.8 us faster at 8192
    # pages, 0.4 at 4096)
    first = tl.maximum(start, 0) // page_size  # (no position lies below 0: a negative start counts as 0)
    last = (end - 1) // page_size  # only used when end > start, i.e. end >= 1
    top = tl.where(end > start, tl.minimum(last, num_pages - 1), -1)
    mid_lo = first + sink
    mid_hi = tl.minimum(last - recent, top)
    valid = (offs >= first) & (offs <= top)
    scored = (offs >= mid_lo) & (offs <= mid_hi)
    n_valid = tl.maximum(top - first + 1, 0)
    n_forced = n_valid - tl.maximum(mid_hi - mid_lo + 1, 0)
    # forced pages above every (finite) score, invalid ones below, lanes past the row below every
    # threshold the search tries (never counted)
    key = tl.where(scored, finite_key(scores), tl.where(valid, KEY_POS_INF, tl.where(in_range, KEY_NEG_INF, -2147483648)))
    lo, hi = tl.reduce((tl.where(scored, key, KEY_POS_INF), tl.where(scored, key, KEY_NEG_INF)), 0, _min_max)
    k = tl.minimum(n_valid, num_select)
    # bracket of the k-th largest key: +inf when the forced pages fill k (no key above it), else the
    # scored pages' range (the forced pages above it)
    fill = k <= n_forced
    lo = tl.where(fill, KEY_POS_INF, lo)
    hi = tl.where(fill, KEY_POS_INF, hi)
    # keys >= lo: every valid page (the forced ones lie above the scored range, the invalid ones below)
    return key, k, lo, hi, tl.where(fill, 0, n_forced), tl.where(fill, n_forced, n_valid)


@triton.jit
def write_selection(key, t, need, k, offs, out_ptr, num_select, BLOCK: tl.constexpr):
    """Write the ``k`` pages kept at threshold ``t`` (every key ``> t``, then the first ``need`` keys
    ``== t`` in index order) ascending at ``out_ptr``, ``-1`` padded to ``num_select``. One scan counts
    both (gt + eq << 16) and gives each kept page its output slot: the kept pages before it."""
    gt = (key > t).to(tl.int32)
    eq = (key == t).to(tl.int32)
    both = tl.cumsum(gt + (eq << 16), axis=0)  # inclusive
    gt_before = (both & 0xFFFF) - gt
    eq_before = (both >> 16) - eq
    sel = (gt > 0) | ((eq > 0) & (eq_before < need))
    slot = gt_before + tl.minimum(eq_before, need)
    tl.store(out_ptr + slot, offs, mask=sel)
    for c in range(0, num_select, BLOCK):
        o = c + tl.arange(0, BLOCK)
        tl.store(out_ptr + o, tl.full([BLOCK], -1, tl.int32), mask=(o >= k) & (o < num_select))


@triton.jit
def select_from_scores(
    scores,
    offs,
    num_pages,
    start,
    end,
    out_ptr,
    num_select,
    page_size,
    sink,
    recent,
    BLOCK: tl.constexpr,
    WAYS: tl.constexpr,
    FINISH: tl.constexpr,
):
    """Select from one row's float32 ``scores`` ``[BLOCK]`` (page ``offs``; lanes ``>= num_pages`` ignored)
    and write ``num_select`` int32 page numbers at ``out_ptr`` (ascending, ``-1`` padded; the row is also
    the search's scratch, see :func:`kth_largest_key`)."""
    key, k, lo, hi, above, n_lo = selection_keys(scores, offs, num_pages, start, end, num_select, page_size, sink, recent)
    t, need = kth_largest_key(key, tl.maximum(k, 1), lo, hi, above, n_lo, out_ptr, num_select, WAYS, FINISH)
    write_selection(key, t, need, k, offs, out_ptr, num_select, BLOCK)


@triton.jit
def prefetch_l2(ptr, nbytes, WARPS: tl.constexpr):
    """Ask L2 to fetch ``nbytes`` (< 2^31) of global memory from ``ptr``, rounded out to 16-byte bounds: each
    of the program's ``WARPS`` warps issues one ``cp.async.bulk.prefetch.L2`` (sm_90) for its share, with
    warp-uniform operands (the instruction takes uniform registers: per-thread operands would be issued
    one distinct value at a time). Nothing comes back to registers. Meant for before :func:`pdl_enter`:
    L2 is the GPU's point of coherence, so a line fetched while the previous grid still writes is updated
    by those writes and the loads after the wait see them; the prefetch only moves DRAM latency and bytes
    earlier, beside the previous grid. ``WARPS = 0``: nothing."""
    if WARPS > 0:
        tl.inline_asm_elementwise(
            f"""{{
            .reg .pred p;
            .reg .b32 w, c, lo, n;
            .reg .b64 a, e;
            mov.u32 w, %tid.x;
            shr.u32 w, w, 5;
            add.u32 c, $2, {16 * WARPS - 1};
            div.u32 c, c, {16 * WARPS};
            shl.b32 c, c, 4;
            mul.lo.u32 lo, w, c;
            sub.s32 n, $2, lo;
            min.s32 n, n, c;
            setp.gt.s32 p, n, 0;
            cvt.u64.u32 e, lo;
            add.u64 a, $1, e;
            cvt.s64.s32 e, n;
            add.u64 e, e, a;
            add.u64 e, e, 15;
            and.b64 e, e, -16;
            and.b64 a, a, -16;
            sub.u64 e, e, a;
            cvt.u32.u64 n, e;
            @p cp.async.bulk.prefetch.L2.global [a], n;
            mov.u32 $0, 0;
            }}""",
            "=r,l,r",
            [ptr.to(tl.pointer_type(tl.int8)), nbytes.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
