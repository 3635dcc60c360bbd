"""Offline long-context tasks: data built deterministically from a seed, no network.

Used through the lm-eval task configs in ``tinyserve_patch/eval/tasks`` (``custom_dataset`` functions).
lm-eval calls them with the task's ``metadata`` merged with ``--model_args`` and ``--metadata``, so they
see ``pretrained`` / ``tokenizer`` and can size every prompt in the evaluated model's own tokens.

Sizing. With a tokenizer (``tokenizer=`` or ``pretrained=`` among the model args, loadable offline), a
prompt of a task named ``..._8k`` holds at most 8192 tokens of that tokenizer: the largest number of
haystack sentences that fits is found by bisection over exact token counts. Without one, lengths are
approximated at ``chars_per_token`` (default 4) characters per token. ``--metadata`` keys (all optional):

* ``context_tokens``: override every task's length (e.g. a tiny smoke run: ``{"context_tokens": 256}``);
* ``data_seed``: seed of keys, values, depths and synthetic haystacks (default 0);
* ``samples_per_depth`` (passkey, default 5), ``num_samples`` (needle tasks, default 25),
  ``num_docs`` (code perplexity, default 25), ``chars_per_token`` (default 4.0);
* ``code_ppl_file``: the ``{"path", "text"}`` jsonl of the code perplexity tasks.

Passkey docs are ordered depth-first (doc ``i`` has depth ``DEPTHS[i % 5]``), so ``--limit 5`` already
covers every depth.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

DEPTHS = (0, 25, 50, 75, 100)
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
CODE_PPL_FILE = TASKS_DIR / "code_ppl" / "heldout.jsonl"
DEFAULT_CHARS_PER_TOKEN = 4.0

# ------------------------------------------------------------------------------------------ sizing


@functools.lru_cache(maxsize=8)
def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _tokenizer_name(kwargs: dict) -> str | None:
    for key in ("tokenizer", "pretrained"):
        value = kwargs.get(key)
        if isinstance(value, str) and value:
            return value
    return None


class TokenCounter:
    """Counts tokens of a prompt with the evaluated model's tokenizer, or estimates them."""

    def __init__(self, kwargs: dict):
        self.name = _tokenizer_name(kwargs)
        self.chars_per_token = float(kwargs.get("chars_per_token") or DEFAULT_CHARS_PER_TOKEN)
        self.tokenizer = None
        if self.name is not None:
            try:
                self.tokenizer = _load_tokenizer(self.name)
            except Exception as err:  # noqa: BLE001 - any load failure falls back to the estimate
                logger.warning(
                    "tinyserve tasks: could not load tokenizer %r (%s); sizing prompts at %.1f chars/token",
                    self.name, err, self.chars_per_token,
                )
        elif not kwargs.get("_quiet"):
            logger.warning(
                "tinyserve tasks: no tokenizer/pretrained in the model args; sizing prompts at %.1f chars/token",
                self.chars_per_token,
            )

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return int(round(len(text) / self.chars_per_token))
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def fit(build: Callable[[int], str], target: int, count: TokenCounter, probe: int = 32) -> tuple[str, int]:
    """The prompt ``build(n)`` with the largest ``n`` whose token count is ``<= target`` (``n = 0`` if even
    that is over). Token counts grow with ``n``: estimate ``n`` from two probes, bracket it by galloping,
    then bisect, so a 64K-token prompt costs about ten tokenizations."""
    base = count(build(0))
    if base >= target:
        logger.warning("tinyserve tasks: a prompt without haystack already has %d tokens (target %d)", base, target)
        return build(0), base
    per_unit = max((count(build(probe)) - base) / probe, 1e-3)
    guess = max(0, int((target - base) / per_unit))
    if count(build(guess)) <= target:  # gallop up
        lo, step = guess, max(1, guess // 32)
        hi = lo + step
        while count(build(hi)) <= target:
            lo, step = hi, step * 2
            hi = lo + step
    else:  # gallop down
        hi, step = guess, max(1, guess // 32)
        lo = max(0, hi - step)
        while lo > 0 and count(build(lo)) > target:
            hi, step = lo, step * 2
            lo = max(0, hi - step)
    while hi - lo > 1:  # count(build(lo)) <= target < count(build(hi))
        mid = (lo + hi) // 2
        if count(build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    text = build(lo)
    return text, count(text)


def _context_tokens(kwargs: dict, default: int) -> int:
    value = kwargs.get("context_tokens")
    return int(value) if value else int(default)


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


_MEMO: dict = {}


def _memo(kind: str, build: Callable[..., list[dict]], *args, **kwargs) -> list[dict]:
    """Rows built once per process and argument set (a budget sweep rebuilds its tasks per budget)."""
    key = (kind, args, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _MEMO:
        _MEMO[key] = build(*args, **kwargs)
    return _MEMO[key]


# ------------------------------------------------------------------------------------------ haystacks

REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river mountain garden window letter market island bridge forest valley station library kitchen harbor "
    "quietly slowly often never always together again early late far near above below across beyond "
    "build carry follow gather hold keep lead move notice open pull reach send share show stand travel turn "
    "bright calm dark deep distant early easy fair gentle heavy hidden large little narrow old plain quiet "
    "rapid rough round sharp short silent simple small soft steady strange strong sudden tall warm wide young"
).split()
_ADJECTIVES = (
    "amber brave clever dusty eager fancy gentle hollow icy jolly keen lucky mellow noble olive proud quick "
    "rusty silver tidy urban vivid witty young zesty"
).split()
_NOUNS = (
    "anchor badger candle dragon ember falcon glacier harbor island jungle kettle lantern meadow nugget "
    "orchard pepper quartz raven saddle tiger umbrella violin walrus yarrow zephyr"
).split()


def synthetic_sentences(rng: random.Random, n: int) -> list[str]:
    """``n`` random sentences of 8-16 common words (a synthetic haystack without any digits)."""
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def repeat_sentences(n: int) -> list[str]:
    return [REPEAT_FILLER] * n


def _with_needles(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Join ``sentences`` with each needle inserted at its depth (0..1 of the way through)."""
    cut = sorted(((round(depth * len(sentences)), i, text) for i, (depth, text) in enumerate(needles)))
    parts, prev = [], 0
    for pos, _, text in cut:
        parts.extend(sentences[prev:pos])
        parts.append(text)
        prev = pos
    parts.extend(sentences[prev:])
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ passkey

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_docs(length: int, **kwargs) -> list[dict]:
    """Passkey retrieval docs of at most ``length`` tokens (``context_tokens`` overrides), the key at each depth of ``DEPTHS``."""
    target = _context_tokens(kwargs, length)
    seed = int(kwargs.get("data_seed") or 0)
    per_depth = int(kwargs.get("samples_per_depth") or 5)
    count = TokenCounter(kwargs)
    rows = []
    for i in range(per_depth * len(DEPTHS)):
        depth = DEPTHS[i % len(DEPTHS)]
        rng = random.Random(f"passkey-{seed}-{target}-{i}")
        key = str(rng.randint(10000, 99999))
        needle = PASSKEY_NEEDLE.format(key=key)

        def build(n: int, depth=depth, needle=needle) -> str:
            return PASSKEY_INTRO + _with_needles(repeat_sentences(n), [(depth / 100, needle)]) + PASSKEY_QUESTION

        text, n_tokens = fit(build, target, count)
        rows.append(
            {"input": text, "target": key, "depth": depth, "context_tokens": target, "n_tokens": n_tokens,
             "exact_tokens": count.exact}
        )
    return rows


def _passkey_length(kwargs: dict) -> int:
    length = kwargs.pop("context_length", None)
    if length is None:
        raise ValueError("tinyserve passkey tasks need metadata.context_length (set in each task yaml)")
    return int(length)


def passkey_dataset(**kwargs):
    """``custom_dataset`` of the passkey tasks (``metadata.context_length`` = the task's length)."""
    length = _passkey_length(kwargs)
    return _dataset(_memo("passkey", passkey_docs, length, **kwargs))


_DIGITS = re.compile(r"\d+")


def _depth_metrics(doc: dict, value: float, prefix: str = "depth_") -> dict:
    return {f"{prefix}{d}": (value if int(doc["depth"]) == d else -1.0) for d in DEPTHS}


def passkey_process_generate(doc: dict, results: list) -> dict:
    """``exact_match``: the first number in the generation is the pass key; per-depth copies."""
    found = _DIGITS.findall(results[0] or "")
    score = float(bool(found) and found[0] == doc["target"])
    return {"exact_match": score, **_depth_metrics(doc, score)}


def passkey_process_loglikelihood(doc: dict, results: list) -> dict:
    """``acc``: the pass key is the greedy continuation; ``logprob`` of the key; per-depth acc."""
    loglikelihood, is_greedy = results[0]
    acc = float(bool(is_greedy))
    return {"acc": acc, "logprob": float(loglikelihood), **_depth_metrics(doc, acc)}


def mean_valid(values: Iterable[float]) -> float:
    """Mean of the per-doc values that apply (``-1`` marks a doc of another depth); -1 if none."""
    kept = [v for v in values if v != -1.0]
    return sum(kept) / len(kept) if kept else -1.0


# ------------------------------------------------------------------------------------------ needles (RULER-style)

NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
NIAH_QUESTION_MV = (
    "\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are"
)
NIAH_VARIANTS = {
    # name: (haystack, number of keys, values per queried key)
    "single": ("repeat", 1, 1),
    "multikey": ("synthetic", 4, 1),
    "multivalue": ("synthetic", 1, 4),
}


def _key(rng: random.Random, taken: set) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def niah_docs(variant: str, length: int, **kwargs) -> list[dict]:
    """RULER-style needle-in-a-haystack docs (``single``, ``multikey``, ``multivalue``)."""
    if variant not in NIAH_VARIANTS:
        raise ValueError(f"unknown needle variant {variant!r}; known: {sorted(NIAH_VARIANTS)}")
    haystack, n_keys, n_values = NIAH_VARIANTS[variant]
    target = _context_tokens(kwargs, length)
    seed = int(kwargs.get("data_seed") or 0)
    n_docs = int(kwargs.get("num_samples") or 25)
    count = TokenCounter(kwargs)
    rows = []
    for i in range(n_docs):
        rng = random.Random(f"niah-{variant}-{seed}-{target}-{i}")
        taken: set = set()
        keys = [_key(rng, taken) for _ in range(n_keys)]
        values = {k: [str(rng.randint(1_000_000, 9_999_999)) for _ in range(n_values)] for k in keys}
        query = keys[0] if n_keys == 1 else rng.choice(keys)
        needles = [(rng.random(), NIAH_NEEDLE.format(key=k, value=v)) for k in keys for v in values[k]]
        question = (NIAH_QUESTION_MV if n_values > 1 else NIAH_QUESTION).format(key=query)
        if haystack == "repeat":
            make = repeat_sentences
        else:
            sent_seed = rng.randint(0, 2**31)
            pool: list[str] = []

            def make(n: int, sent_seed=sent_seed, pool=pool) -> list[str]:
                if len(pool) < n:  # always a prefix of one seeded stream, whatever n the search asks for
                    pool[:] = synthetic_sentences(random.Random(sent_seed), max(n, 2 * len(pool)))
                return pool[:n]

        def build(n: int, make=make, needles=needles, question=question) -> str:
            return NIAH_INTRO + _with_needles(make(n), needles) + question

        text, n_tokens = fit(build, target, count)
        rows.append(
            {"input": text, "outputs": values[query], "query": query, "variant": variant,
             "context_tokens": target, "n_tokens": n_tokens, "exact_tokens": count.exact}
        )
    return rows


def niah_dataset(**kwargs):
    """``custom_dataset`` of the needle tasks (``metadata.variant`` and ``metadata.context_length``)."""
    variant = kwargs.pop("variant", None)
    length = kwargs.pop("context_length", None)
    if variant is None or length is None:
        raise ValueError("tinyserve needle tasks need metadata.variant and metadata.context_length")
    return _dataset(_memo("niah", niah_docs, str(variant), int(length), **kwargs))


def niah_process_results(doc: dict, results: list) -> dict:
    """``score``: the fraction of the queried key's values found in the generation (RULER's
    string_match_all); ``all_found``: 1 if every one of them is."""
    pred = (results[0] or "").strip().lower()
    found = [v.lower() in pred for v in doc["outputs"]]
    return {"score": sum(found) / len(found), "all_found": float(all(found))}


# ------------------------------------------------------------------------------------------ code perplexity


def code_ppl_docs(length: int, **kwargs) -> list[dict]:
    """Long code documents of ``length * chars_per_token`` characters (tokenizer-agnostic).

    Each record's text is cut at that many characters (at the end of a line when one ends in the last
    10%); a record shorter than that is continued with the following records (``\\n\\n`` between them).
    ``loglikelihood_rolling`` scores the whole document."""
    target = _context_tokens(kwargs, length)
    chars = int(target * float(kwargs.get("chars_per_token") or DEFAULT_CHARS_PER_TOKEN))
    path = Path(kwargs.get("code_ppl_file") or CODE_PPL_FILE)
    if not path.exists():
        raise FileNotFoundError(
            f"code perplexity data {path} is missing: pass --metadata '{{\"code_ppl_file\": \"/path/to.jsonl\"}}' "
            "(one {\"path\": ..., \"text\": ...} object per line)"
        )
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records")
    n_docs = int(kwargs.get("num_docs") or 25)
    rows = []
    for i, rec in enumerate(records):
        if len(rows) >= n_docs:
            break
        text, sources, j = rec["text"], [rec.get("path", str(i))], i
        while len(text) < chars and j + 1 < len(records):
            j += 1
            text += "\n\n" + records[j]["text"]
            sources.append(records[j].get("path", str(j)))
        if len(text) < chars:
            break  # the remaining records together are too short
        cut = text[:chars]
        newline = cut.rfind("\n")
        if newline >= int(chars * 0.9):
            cut = cut[: newline + 1]
        rows.append({"text": cut, "source": " + ".join(sources), "context_tokens": target, "chars": len(cut)})
    if not rows:
        raise ValueError(f"{path}: no document reaches {chars} characters ({target} tokens x chars_per_token)")
    return rows


def code_ppl_dataset(**kwargs):
    """``custom_dataset`` of the code perplexity tasks (``metadata.context_length`` = nominal tokens)."""
    length = kwargs.pop("context_length", None)
    if length is None:
        raise ValueError("tinyserve code perplexity tasks need metadata.context_length")
    return _dataset(_memo("code_ppl", code_ppl_docs, int(length), **kwargs))
