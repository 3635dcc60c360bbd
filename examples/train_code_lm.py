"""Train the small code LM that ships with tinyserve-patch (``tinyserve_patch/models/tinyserve-code-lm``).

No language-model weights can be downloaded on the machines this project runs on, so the project trains
its own: a GQA Llama (8 query heads / 2 KV heads, head_dim 64) on the CPython standard library's source.

    python examples/train_code_lm.py --out $OUT/model --minutes 9     # the real run (one H100, ~9.5 min)
    python examples/train_code_lm.py --smoke                          # end-to-end check on a CPU, < 60 s
    python examples/train_code_lm.py --tokenizer-only                 # (re)train only the tokenizer
    python examples/train_code_lm.py --export-heldout                 # (re)write the eval's heldout.jsonl

Corpus
    1. Every ``*.py`` file under the running interpreter's stdlib (``sysconfig.get_paths()['stdlib']``),
       walked in sorted order without following symlinks, leaving out ``site-packages``/``dist-packages``
       and files that are not valid UTF-8 or are empty. Test packages (``test/``, ``*/tests/``,
       ``idle_test/``) are KEPT: they are ~60% of a full stdlib's code.
    2. The installed packages' ``*.py`` files (the interpreter's site-packages dirs), up to --site-chars
       characters (default 200M; 0 turns this off): files <= 512 KB, exact duplicates dropped, taken in
       sha1(relpath) order (a deterministic mix of every package) until the cap. Why: the stdlib alone is
       far too small. The GPU image's Ubuntu Python 3.12 ships 567 stdlib files (no test suite): 2.6 M
       train tokens, which this model at ~1 M tokens/s overfits within a minute (validation loss at its
       best after ~12 epochs, then rising). With the packages (torch, transformers, jax, sympy, ...) the
       run sees each token a few times instead of 150.
Split
    A stdlib file is held out when ``int(sha1(relpath), 16) % 10 == 0`` (relpath is POSIX, relative to the
    stdlib dir). In addition, every relpath listed in ``tinyserve_patch/eval/tasks/code_ppl/heldout.jsonl``
    (when that file exists) is excluded from training. The eval texts are DEFINED by that file: it was
    exported once from the Python 3.11 stdlib with the shipped tokenizer (``--export-heldout``), and the
    training machine may run another Python (3.12), whose stdlib differs; excluding by relpath guarantees
    the exported eval texts are never trained on, whichever stdlib the run reads. Held-out files of the
    running stdlib that are not in heldout.jsonl form the validation set (used to keep the best weights).
    Decontamination: any training file (stdlib or package) whose significant lines (stripped, >= 25
    chars) are >= 50% found in the heldout.jsonl or validation texts is dropped too (vendored or renamed
    copies of an eval file; the near-identical codec tables of ``encodings/``).
heldout.jsonl
    Hash-held-out stdlib files with >= 8192 tokens (under the shipped tokenizer) and <= 256 KB, taken in
    the order of sha1(relpath) until ~2 MB in total, written sorted by path; one JSON object a line:
    {"path", "text", "n_tokens"}. Without the file (a checkout that lacks it), the run derives the same
    kind of set from the running stdlib.
Tokenizer
    Byte-level BPE (HF ``tokenizers``), vocab 8192, trained on the stdlib train split (deterministic),
    saved as a PreTrainedTokenizerFast (bos ``<|bos|>``, eos ``<|endoftext|>``, pad ``<|pad|>``; encoding
    prepends bos). By default (``--reuse-tokenizer``) a tokenizer already in ``--out`` or in the shipped
    model dir is reused, so the GPU run uses the tokenizer committed to the repo (trained on CPython 3.11).
Model and training
    LlamaForCausalLM: hidden 512, 6 layers, 8/2 heads (head_dim 64), intermediate 512, rope_theta 1e5,
    max_position_embeddings 8192, tied embeddings: 12.85M parameters, 25.7 MB in bf16. (The repo ships
    it, so the MLP is narrow to keep the weights near 25 MB; --layers/--intermediate change it.)
    Documents are packed as ``<|bos|> text <|endoftext|>`` into one stream; batches are random windows
    of --seq-len (4096) tokens, --batch-size (16) a step, and for the last --long-frac (15%) of the
    schedule windows of --long-seq-len (8192) at the same tokens per step, so the model is trained at
    the 8K context it is evaluated at. bf16 autocast, torch.compile (both shapes compiled before the
    clock starts; eager fallback if compile fails), fused AdamW (0.9, 0.95, wd 0.1), grad clip 1.0,
    linear warm-up then cosine decay to 10% driven by the elapsed share of the time budget, fixed seed.
    --minutes is the budget of the WHOLE run (start of the script to the saved model): training stops
    --reserve-s seconds early to evaluate and save. Every --eval-every seconds the validation loss is
    measured and the best weights are kept; the better of those and the final weights is saved.
    An H100 trains this model at ~1.0 M tokens/s at 4096 context (batch 16 x 4096).
Output (a flat dir of at most 8 files, each < 16 MiB)
    config.json, generation_config.json, model-0000{1,2}-of-00002.safetensors (bf16),
    model.safetensors.index.json, tokenizer.json, tokenizer_config.json, training_report.json
    (train / validation / held-out losses at 4096 and 8192 context, the unigram baseline's held-out
    cross-entropy in nats per token from train-split counts with add-one smoothing, parameters, tokens
    seen, seconds, versions, device).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = REPO_ROOT / "tinyserve_patch" / "models" / "tinyserve-code-lm"
HELDOUT_JSONL = REPO_ROOT / "tinyserve_patch" / "eval" / "tasks" / "code_ppl" / "heldout.jsonl"

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 8192
HELDOUT_MIN_TOKENS = 8192
HELDOUT_MAX_FILE_BYTES = 256_000
HELDOUT_MAX_TOTAL_BYTES = 2_000_000
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SITE_MAX_FILE_BYTES = 512_000
DECONTAM_MIN_LINE = 25
DECONTAM_THRESHOLD = 0.5
MAX_FILES_OUT = 8
MAX_FILE_BYTES_OUT = 16 * 1024 * 1024


def log(msg: str) -> None:
    print(f"[train_code_lm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_corpus(root: Path | None = None) -> list[tuple[str, str]]:
    """(relpath, text) of every UTF-8 ``*.py`` file under the stdlib, sorted by relpath."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                out.append((path.relative_to(root).as_posix(), text))
    out.sort(key=lambda item: item[0])
    return out


def site_dirs() -> list[Path]:
    """The running interpreter's site-packages dirs (a venv's own, or the system's)."""
    import site

    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # some embedded interpreters
        pass
    std = stdlib_root()
    dirs = {Path(d).resolve() for d in paths if Path(d).is_dir()}
    return sorted(d for d in dirs if d != std)


def list_site_corpus(max_chars: int, max_file_bytes: int = SITE_MAX_FILE_BYTES) -> list[tuple[str, str]]:
    """(relpath, text) of UTF-8 ``*.py`` files of the installed packages, up to max_chars in total.

    Files over max_file_bytes (generated tables) and exact duplicates are skipped; files are taken in
    the order of sha1(relpath) (a deterministic mix of all packages) until the cap, then sorted."""
    if max_chars <= 0:
        return []
    cands = []
    for base in site_dirs():
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.endswith(".dist-info")
                                 and not d.endswith(".egg-info") and not d.startswith("tinyserve"))
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if 0 < size <= max_file_bytes and not path.is_symlink():
                    cands.append(("site-packages/" + path.relative_to(base).as_posix(), path))
    cands.sort(key=lambda c: (hashlib.sha1(c[0].encode("utf-8")).hexdigest(), c[0]))
    out, seen, total = [], set(), 0
    for rel, path in cands:
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in seen or not text.strip():
            continue
        seen.add(digest)
        out.append((rel, text))
        total += len(text)
        if total >= max_chars:
            break
    out.sort(key=lambda item: item[0])
    return out


def significant_lines(text: str) -> list[str]:
    return [ln for ln in (x.strip() for x in text.splitlines()) if len(ln) >= DECONTAM_MIN_LINE]


def decontaminate(files, protected_texts, threshold: float = DECONTAM_THRESHOLD):
    """Drop files that share >= threshold of their significant lines (stripped, >= 25 chars) with the
    protected (held-out / validation) texts: vendored or renamed copies of an eval file, codec tables."""
    protected = set()
    for t in protected_texts:
        protected.update(significant_lines(t))
    kept, dropped = [], []
    for rel, text in files:
        lines = significant_lines(text)
        if len(lines) >= 10 and sum(ln in protected for ln in lines) >= threshold * len(lines):
            dropped.append(rel)
        else:
            kept.append((rel, text))
    return kept, dropped


def path_hash(relpath: str) -> int:
    return int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16)


def is_hash_heldout(relpath: str) -> bool:
    return path_hash(relpath) % 10 == 0


def load_heldout_jsonl(path: Path = HELDOUT_JSONL) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_corpus(files, heldout_paths: set[str]):
    """train: not hash-held-out and not in heldout.jsonl; val: the other files, minus heldout.jsonl's."""
    train = [(p, t) for p, t in files if not is_hash_heldout(p) and p not in heldout_paths]
    val = [(p, t) for p, t in files if is_hash_heldout(p) and p not in heldout_paths]
    return train, val


# -------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=8192, clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    prune_tokenizer_extras(out)
    cfg_path = out / "tokenizer_config.json"  # the class name every transformers version resolves
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def prune_tokenizer_extras(out: Path) -> None:
    """tokenizer_config.json names the special tokens already: drop the redundant files (8-file limit)."""
    for name in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)


def has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").exists() and (d / "tokenizer_config.json").exists()


def load_raw_tokenizer(d: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(d / "tokenizer.json"))


def encode_texts(tok, texts: list[str]) -> list[list[int]]:
    """Batch-encode in Rust over all cores, no special tokens (added by the caller)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def encode_stream(tok, texts: list[str], bos_id: int, eos_id: int, chunk_chars: int = 32_000_000):
    """One int32 stream of ``bos text eos`` for every text; encoded in batches of ~chunk_chars (all cores)."""
    import numpy as np

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    bos, eos = np.array([bos_id], np.int32), np.array([eos_id], np.int32)
    parts, batch, size = [], [], 0
    for i, text in enumerate(texts):
        batch.append(text)
        size += len(text)
        if size >= chunk_chars or i == len(texts) - 1:
            for e in tok.encode_batch(batch, add_special_tokens=False):
                parts += [bos, np.asarray(e.ids, dtype=np.int32), eos]
            batch, size = [], 0
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def obtain_tokenizer(args, train_texts: list[str], out: Path):
    """Reuse the tokenizer in --out or --tokenizer (default: the shipped one), else train one; save to out."""
    if args.reuse_tokenizer:
        for cand in (out, Path(args.tokenizer)):
            if has_tokenizer(cand):
                log(f"reusing tokenizer from {cand}")
                if cand.resolve() != out.resolve():
                    out.mkdir(parents=True, exist_ok=True)
                    for name in ("tokenizer.json", "tokenizer_config.json"):
                        shutil.copy2(cand / name, out / name)
                return load_raw_tokenizer(out), "reused:" + str(cand)
    t = time.time()
    tok = train_tokenizer(train_texts, args.vocab_size)
    save_tokenizer(tok, out)
    log(f"trained tokenizer (vocab {tok.get_vocab_size()}) in {time.time() - t:.1f}s")
    return load_raw_tokenizer(out), "trained"


# ---------------------------------------------------------------------------------------- held-out set
def select_heldout_long(files, tok, min_tokens=HELDOUT_MIN_TOKENS, max_file_bytes=HELDOUT_MAX_FILE_BYTES,
                        max_total_bytes=HELDOUT_MAX_TOTAL_BYTES) -> list[dict]:
    """Hash-held-out files with >= min_tokens tokens, in sha1(relpath) order, until max_total_bytes."""
    cands = [(p, t) for p, t in files if is_hash_heldout(p) and len(t.encode("utf-8")) <= max_file_bytes]
    cands.sort(key=lambda item: (hashlib.sha1(item[0].encode("utf-8")).hexdigest(), item[0]))
    counts = [len(ids) for ids in encode_texts(tok, [t for _, t in cands])]
    chosen, total = [], 0
    for (p, t), n in zip(cands, counts):
        size = len(t.encode("utf-8"))
        if n < min_tokens or total + size > max_total_bytes:
            continue
        chosen.append({"path": p, "text": t, "n_tokens": n})
        total += size
    chosen.sort(key=lambda r: r["path"])
    return chosen


def export_heldout(out_path: Path, tokenizer_dir: Path) -> list[dict]:
    tok = load_raw_tokenizer(tokenizer_dir)
    rows = select_heldout_long(list_corpus(), tok)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    log(f"wrote {len(rows)} held-out files, {sum(r['n_tokens'] for r in rows)} tokens, "
        f"{out_path.stat().st_size} bytes -> {out_path}")
    return rows


# ------------------------------------------------------------------------------------------------ model
def make_config(args, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig

    head_dim = args.hidden // args.heads
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=head_dim, max_position_embeddings=8192, rope_theta=args.rope_theta, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        initializer_range=0.02, attention_bias=False, mlp_bias=False, use_cache=True,
    )


def make_windows(docs: list[list[int]], seq_len: int, pad_id: int):
    """Non-overlapping windows of each doc: inputs (seq_len) and targets (seq_len, -100 where padded)."""
    xs, ys = [], []
    for ids in docs:
        for s in range(0, len(ids) - 1, seq_len):
            chunk = ids[s : s + seq_len + 1]
            if len(chunk) < 2:
                continue
            x, y = chunk[:-1], chunk[1:]
            n = len(x)
            xs.append(x + [pad_id] * (seq_len - n))
            ys.append(y + [-100] * (seq_len - n))
    return xs, ys


def evaluate(model, xs, ys, batch_size: int, device, use_bf16: bool) -> tuple[float, int]:
    """Token-weighted mean cross-entropy (nats) over all non-padded targets."""
    import torch
    import torch.nn.functional as F

    if not xs:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            x = torch.tensor(xs[i : i + batch_size], dtype=torch.long, device=device)
            y = torch.tensor(ys[i : i + batch_size], dtype=torch.long, device=device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                   ignore_index=-100, reduction="sum")
            total += loss.double()
            count += int((y != -100).sum())
    if was_training:
        model.train()
    return float(total) / max(count, 1), count


def unigram_ce(train_stream, ys, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of train-split unigram counts with add-one smoothing."""
    import numpy as np

    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    y = np.asarray(ys, dtype=np.int64).reshape(-1)
    y = y[y != -100]
    return float(-logp[y].mean()) if y.size else float("nan")


def save_model(model, out: Path, shard: str) -> list[tuple[str, int]]:
    import torch

    for name in os.listdir(out):  # stale weights of an earlier run
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")):
            (out / name).unlink()
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out), max_shard_size=shard)
    prune_tokenizer_extras(out)
    return sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------------- training
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help=f"output dir (default {SHIPPED_DIR}; /tmp/... with --smoke)")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall budget of the whole run (default 9)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--long-seq-len", type=int, default=8192, help="context of the final phase (default 8192)")
    ap.add_argument("--long-frac", type=float, default=0.15,
                    help="share of the schedule trained at --long-seq-len (0: all at --seq-len)")
    ap.add_argument("--site-chars", type=float, default=200e6,
                    help="chars of installed packages' *.py code added to the corpus (0: stdlib only)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences of --seq-len per step (default 16)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run, a few steps, < 60 s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--max-epochs", type=float, default=0.0,
                    help="also end the schedule after this many passes over the train tokens (0: time only)")
    ap.add_argument("--eval-every", type=float, default=30.0, help="seconds between validation evals")
    ap.add_argument("--reserve-s", type=float, default=40.0, help="seconds kept for final eval + save")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile the training step (auto: on CUDA, not with --smoke)")
    ap.add_argument("--reuse-tokenizer", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tokenizer", default=str(SHIPPED_DIR), help="where to look for a tokenizer to reuse")
    ap.add_argument("--heldout", default=str(HELDOUT_JSONL), help="heldout.jsonl (excluded, and the eval set)")
    ap.add_argument("--shard", default="15MB", help="max_shard_size for save_pretrained (files < 16 MiB)")
    ap.add_argument("--tokenizer-only", action="store_true", help="train + save the tokenizer into --out, exit")
    ap.add_argument("--export-heldout", action="store_true", help="write --heldout with --tokenizer, exit")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke = dict(seq_len=128, long_seq_len=256, site_chars=2e6, batch_size=4, hidden=64, layers=2, heads=4,
                     kv_heads=2, intermediate=128,
                     warmup_steps=10, max_steps=120, eval_every=1e9, reserve_s=0.0)
        for k, v in smoke.items():
            if argv_has(argv, "--" + k.replace("_", "-")):
                continue
            setattr(args, k, v)
        if not argv_has(argv, "--minutes"):
            args.minutes = 0.6
    if args.out is None:
        args.out = "/tmp/tinyserve-code-lm-smoke" if args.smoke else str(SHIPPED_DIR)
    return args


def argv_has(argv, flag: str) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(argv=None) -> dict | None:
    t_start = time.time()
    args = parse_args(argv)
    out = Path(args.out)

    if args.export_heldout:
        export_heldout(Path(args.heldout), Path(args.tokenizer))
        return None

    heldout_rows = load_heldout_jsonl(Path(args.heldout))
    heldout_paths = {r["path"] for r in heldout_rows}
    root = stdlib_root()
    files = list_corpus(root)
    train_files, val_files = split_corpus(files, heldout_paths)
    log(f"stdlib {root}: {len(files)} files ({sum(len(t) for _, t in files) / 1e6:.1f} M chars); "
        f"train {len(train_files)}, val {len(val_files)}, heldout.jsonl {len(heldout_rows)} files")
    if args.smoke:  # a slice of the corpus keeps the CPU run short
        train_files = train_files[:: max(1, len(train_files) // 150)][:150]
        val_files = val_files[:20]
        heldout_rows = heldout_rows[:2]
    if not train_files:
        raise SystemExit("no training files found under the stdlib")

    if args.tokenizer_only:
        args.reuse_tokenizer = False
        obtain_tokenizer(args, [t for _, t in train_files], out)
        return None
    tok, tok_source = obtain_tokenizer(args, [t for _, t in train_files], out)

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    vocab = tok.get_vocab_size()
    bos_id, eos_id, pad_id = tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD)
    if not heldout_rows:  # no exported eval set: derive it from this stdlib's held-out files
        log(f"{args.heldout} not found: using this stdlib's held-out long files")
        heldout_rows = select_heldout_long(files, tok)
        if args.smoke:
            heldout_rows = heldout_rows[:2]
        val_files = [(p, t) for p, t in val_files if p not in {r["path"] for r in heldout_rows}]

    # Installed packages' code: the stdlib alone is small (Ubuntu's 3.12 has ~2.6 M train tokens).
    t = time.time()
    site_files = list_site_corpus(args.site_chars)
    protected = [r["text"] for r in heldout_rows] + [t_ for _, t_ in val_files]
    n_std = len(train_files)
    train_files, dropped = decontaminate(train_files + site_files, protected)
    n_std_kept = sum(1 for p_, _ in train_files if not p_.startswith("site-packages/"))
    log(f"site-packages: {len(site_files)} files ({sum(len(t_) for _, t_ in site_files) / 1e6:.1f} M chars) "
        f"from {[str(d) for d in site_dirs()]}; decontamination dropped {len(dropped)} files "
        f"({n_std - n_std_kept} of the stdlib's) in {time.time() - t:.1f}s")

    t = time.time()
    std_stream = encode_stream(tok, [t_ for p_, t_ in train_files if not p_.startswith("site-packages/")],
                               bos_id, eos_id)
    site_stream = encode_stream(tok, [t_ for p_, t_ in train_files if p_.startswith("site-packages/")],
                                bos_id, eos_id)
    train_stream = np.concatenate([std_stream, site_stream])
    val_ids = encode_texts(tok, [t_ for _, t_ in val_files])
    held_ids = encode_texts(tok, [r["text"] for r in heldout_rows])
    if args.smoke:
        held_ids = [ids[:2048] for ids in held_ids]
    train_chars = sum(len(t_) for _, t_ in train_files)
    log(f"tokenized in {time.time() - t:.1f}s: train {train_stream.size / 1e6:.2f} M tokens "
        f"({train_chars / max(train_stream.size, 1):.2f} chars/token), val {sum(map(len, val_ids)) / 1e6:.3f} M, "
        f"heldout {sum(map(len, held_ids)) / 1e6:.3f} M")
    log(f"train tokens: stdlib {std_stream.size / 1e6:.2f} M + site-packages {site_stream.size / 1e6:.2f} M")

    seq, long_seq = args.seq_len, args.long_seq_len or args.seq_len
    docs = lambda ids_list: [[bos_id, *ids, eos_id] for ids in ids_list]  # noqa: E731
    held_x, held_y = make_windows(docs(held_ids), seq, pad_id)
    held_xl, held_yl = make_windows(docs(held_ids), long_seq, pad_id)
    val_stream = [i for ids in docs(val_ids) for i in ids]
    n_val = min(len(val_stream) // (seq + 1), 8 if args.smoke else 40)
    val_x = [val_stream[k * (seq + 1) : k * (seq + 1) + seq] for k in range(n_val)]
    val_y = [val_stream[k * (seq + 1) + 1 : (k + 1) * (seq + 1)] for k in range(n_val)]
    if not val_x:
        val_x, val_y = held_x, held_y
    rng = np.random.default_rng(args.seed + 1)
    tr_starts = rng.integers(0, train_stream.size - seq - 1, size=8 if args.smoke else 40)
    trn_x = [train_stream[s : s + seq].tolist() for s in tr_starts]
    trn_y = [train_stream[s + 1 : s + seq + 1].tolist() for s in tr_starts]
    uni = unigram_ce(train_stream, held_y, vocab)
    uni_std = unigram_ce(std_stream, held_y, vocab)
    del site_stream
    log(f"unigram baseline (add-one, train counts): held-out CE {uni:.4f} nats/token "
        f"(stdlib train counts only: {uni_std:.4f})")

    # ----------------------------------------------------------------------------------- model + optim
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    use_bf16 = device.type == "cuda" or args.smoke
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = make_config(args, vocab, bos_id, eos_id, pad_id)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    log(f"model: {n_params / 1e6:.2f} M params ({(n_params - n_embed) / 1e6:.2f} M non-embedding), "
        f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
        f"intermediate {args.intermediate}, device {device}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if device.type == "cuda" else {}),
    )

    def loss_fn(x, y):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    data = torch.from_numpy(train_stream).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    bsz = args.batch_size
    long_bsz = max(1, bsz * seq // long_seq)
    long_frac = args.long_frac if long_seq != seq else 0.0
    shapes = [(bsz, seq)] + ([(long_bsz, long_seq)] if long_frac > 0 else [])

    def get_batch(b, n):
        starts = torch.randint(0, data.numel() - n - 1, (b, 1), device=device, generator=gen)
        w = data[starts + torch.arange(n + 1, device=device)].long()
        return w[:, :-1], w[:, 1:]

    step_fn = loss_fn
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda" and not args.smoke)
    if use_compile:
        t = time.time()
        try:
            step_fn = torch.compile(loss_fn, dynamic=False)
            for b, n in shapes:  # both phases' shapes, before the clock of the schedule starts
                x, y = get_batch(b, n)
                step_fn(x, y).backward()
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            log(f"compiled {shapes} in {time.time() - t:.1f}s")
        except Exception as e:  # robust: fall back to eager rather than lose the run
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eager")
            step_fn, use_compile = loss_fn, False
            opt.zero_grad(set_to_none=True)
            torch._dynamo.reset()

    # ----------------------------------------------------------------------------------------- train
    deadline = t_start + args.minutes * 60.0 - args.reserve_s
    t_train0 = time.time()
    train_budget = max(deadline - t_train0, 1.0)
    token_budget = args.max_epochs * train_stream.size if args.max_epochs > 0 else float("inf")
    step, tokens_seen, long_step0 = 0, 0, None
    loss_acc = torch.zeros((), device=device)
    acc_n = 0
    history, last_log, last_eval = [], time.time(), time.time()
    best = {"val_loss": float("inf"), "step": 0, "state": None}
    train_loss_recent = float("nan")

    def snapshot_if_best(val_loss):
        if val_loss < best["val_loss"]:
            best.update(val_loss=val_loss, step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    log(f"training: budget {train_budget:.0f}s, batch {bsz} x {seq} = {bsz * seq} tokens/step"
        + (f", last {long_frac:.0%} at {long_bsz} x {long_seq}" if long_frac > 0 else "")
        + f", peak lr {args.lr}, warm-up {args.warmup_steps} steps, compile {use_compile}")
    while True:
        now = time.time()
        progress = max((now - t_train0) / train_budget, tokens_seen / token_budget)
        if progress >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        warm = min(1.0, (step + 1) / max(args.warmup_steps, 1))
        cos = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        lr = args.lr * warm * cos
        for g in opt.param_groups:
            g["lr"] = lr
        if progress >= 1.0 - long_frac:
            if long_step0 is None:
                long_step0 = step
                log(f"step {step}: context {long_seq} from here on")
            x, y = get_batch(long_bsz, long_seq)
        else:
            x, y = get_batch(bsz, seq)
        loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach()
        acc_n += 1
        step += 1
        tokens_seen += x.numel()
        now = time.time()
        if now - last_log >= (5.0 if args.smoke else 15.0) or (args.max_steps and step >= args.max_steps):
            train_loss_recent = float(loss_acc) / acc_n
            elapsed = now - t_train0
            rec = {"step": step, "tokens": tokens_seen, "s": round(elapsed, 1), "lr": lr,
                   "train_loss": round(train_loss_recent, 4), "tok_per_s": round(tokens_seen / elapsed)}
            if now - last_eval >= args.eval_every:
                rec["val_loss"] = round(evaluate(model, val_x, val_y, bsz, device, use_bf16)[0], 4)
                snapshot_if_best(rec["val_loss"])
                last_eval = time.time()
            history.append(rec)
            log(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
                + f" epochs {tokens_seen / train_stream.size:.2f}")
            loss_acc.zero_()
            acc_n = 0
            last_log = now
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t_train0
    if acc_n:
        train_loss_recent = float(loss_acc) / acc_n

    # -------------------------------------------------------------------------------------- evaluate
    final_val = evaluate(model, val_x, val_y, bsz, device, use_bf16)[0]
    log(f"final step {step}: val loss {final_val:.4f}; best earlier {best['val_loss']:.4f} at step {best['step']}")
    selected = "final"
    if best["state"] is not None and best["val_loss"] < final_val:
        model.load_state_dict(best["state"])
        selected = f"best@{best['step']}"
    best["state"] = None
    val_loss = min(final_val, best["val_loss"])
    train_eval = evaluate(model, trn_x, trn_y, bsz, device, use_bf16)[0]
    held_loss, held_n = evaluate(model, held_x, held_y, bsz, device, use_bf16)
    held_loss_l, _ = evaluate(model, held_xl, held_yl, long_bsz, device, use_bf16)
    log(f"selected {selected}: train {train_eval:.4f}, val {val_loss:.4f}, held-out@{seq} {held_loss:.4f} "
        f"(ppl {math.exp(held_loss):.2f}, {held_n} tokens), held-out@{long_seq} {held_loss_l:.4f}, "
        f"unigram {uni:.4f}")

    # ------------------------------------------------------------------------------------------ save
    model.generation_config.bos_token_id = bos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    files_out = save_model(model, out, args.shard)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    probe = 'class Stack:\n    """A last-in first-out stack."""\n\n    def push(self, item):'
    enc = hf_tok(probe, return_tensors="pt").to(device)
    model.eval()
    with torch.no_grad():
        gen_ids = model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=pad_id)
    sample = hf_tok.decode(gen_ids[0], skip_special_tokens=True)
    round_trip = hf_tok.decode(hf_tok(probe)["input_ids"], skip_special_tokens=True) == probe

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "model": "tinyserve-code-lm",
        "smoke": bool(args.smoke),
        "train_loss": round(train_eval, 4),
        "train_loss_last_steps": round(train_loss_recent, 4),
        "val_loss": round(val_loss, 4),
        "heldout_loss": round(held_loss, 4),
        "heldout_ppl": round(math.exp(held_loss), 3),
        "heldout_context": seq,
        "heldout_tokens": held_n,
        "heldout_files": len(heldout_rows),
        "heldout_loss_long": round(held_loss_l, 4),
        "heldout_context_long": long_seq,
        "unigram_heldout_ce": round(uni, 4),
        "unigram_heldout_ce_stdlib_counts": round(uni_std, 4),
        "loss_units": "nats per token (cross-entropy)",
        "selected_checkpoint": selected,
        "params": n_params,
        "params_non_embedding": n_params - n_embed,
        "config": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                   "intermediate": args.intermediate, "vocab": vocab, "rope_theta": args.rope_theta,
                   "max_position_embeddings": 8192, "tie_word_embeddings": True},
        "seq_len": seq,
        "batch_size": bsz,
        "long_seq_len": long_seq if long_frac > 0 else None,
        "long_batch_size": long_bsz if long_frac > 0 else None,
        "long_from_step": long_step0,
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs_seen": round(tokens_seen / train_stream.size, 3),
        "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9)),
        "train_tokens": int(train_stream.size),
        "train_tokens_stdlib": int(std_stream.size),
        "train_files": len(train_files),
        "site_files": len(site_files),
        "site_chars_cap": args.site_chars,
        "decontaminated_files": len(dropped),
        "val_files": len(val_files),
        "lr": args.lr, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
        "seconds_train": round(train_seconds, 1),
        "seconds_total": round(time.time() - t_start, 1),
        "compiled": use_compile,
        "seed": args.seed,
        "tokenizer": tok_source,
        "tokenizer_round_trip": round_trip,
        "sample": sample,
        "history": history,
        "corpus": {"stdlib": str(root), "python": platform.python_version(), "stdlib_files": len(files),
                   "site_dirs": [str(d) for d in site_dirs()]},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": dev_name,
        "weights_dtype": "bfloat16",
        "files": dict(files_out),
    }
    with open(out / "training_report.json", "w") as f:
        json.dump(report, f, indent=1)
    listing = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    log("wrote " + ", ".join(f"{n} ({s / 1e6:.2f} MB)" for n, s in listing))
    if len(listing) > MAX_FILES_OUT or any(s >= MAX_FILE_BYTES_OUT for _, s in listing):
        log(f"WARNING: more than {MAX_FILES_OUT} files or a file >= 16 MiB in {out}")
    log(f"sample: {sample!r}")
    log(f"done in {time.time() - t_start:.1f}s")
    return report


if __name__ == "__main__":
    main()
