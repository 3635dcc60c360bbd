"""Quick-start: patch a model, generate dense and sparse, print speed and agreement side by side.

    python examples/quickstart.py                      # shipped code model (offline), GPU if present
    python examples/quickstart.py --model meta-llama/Llama-3.1-8B --context 32768 --budget 2048

Rows: HF's own dense decoding (unpatched), tinyserve with every token attended (token_budget=dense,
same cache and kernels path), and tinyserve sparse. Agreement and KL compare each row's next-token
distributions with HF dense on the same (teacher-forced) prefixes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
import transformers

import tinyserve_patch as tp
from tinyserve_patch.decode import decode_logits, mean_kl


def load_model(name: str | None, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if name is None:
        try:
            from tinyserve_patch.models import default_model_path, has_default_model
        except ImportError:  # an install without the models package
            has_default_model = lambda: False  # noqa: E731
        if has_default_model():
            name = str(default_model_path())
        else:
            print("[quickstart] the shipped model is missing: using a tiny random-weight Llama (numbers are not meaningful)")
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=65536,
            )
            model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
            return model, None, "random-llama"
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer, name


def prompt_ids(tokenizer, vocab: int, context: int, batch: int, device: str) -> torch.Tensor:
    """A long real prompt: the CPython standard library's own source (every machine has it)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab, (batch, context), generator=g).to(device)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer.model_max_length = 1 << 30  # whole files are tokenized, then cut to `context`
    ids: list[int] = []
    for name in ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "enum.py"):
        path = stdlib / name
        if path.exists():
            ids += tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= context * batch:
            break
    while len(ids) < context * batch:
        ids += ids
    rows = [ids[i * context : (i + 1) * context] for i in range(batch)]
    return torch.tensor(rows, device=device)


def timed_generate(model, ids, new_tokens: int, device: str, repeats: int = 1) -> tuple[torch.Tensor, float, list[float]]:
    """``(tokens generated, median tokens/s, every timed call's tokens/s)`` over ``repeats`` identical
    ``generate()`` calls after an untimed one that compiles the decode step on CUDA (a patched model's
    cache is sized to prompt + new tokens, so a shorter warm-up would leave a recompilation inside a
    timed call). A single timed call of this small model at batch 1 is host-bound and varied by up to
    ~1.7x between runs on the H200 (``benchmarks/results/quickstart_h200_spread.json``): hence the median."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    rates = []
    for _ in range(max(1, repeats)):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(ids.shape[0] * new_tokens / (time.perf_counter() - start))
    return out[:, ids.shape[1] :], statistics.median(rates), rates


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id or local path (default: the shipped code model)")
    p.add_argument("--context", type=int, default=8192 if gpu else 1024, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64 if gpu else 16)
    p.add_argument("--budget", type=int, default=1024 if gpu else 256, help="token_budget of the sparse row")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5 if gpu else 1, help="timed generate() calls per mode (median)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = "cuda" if gpu else "cpu"
    if not gpu:
        print("[quickstart] no GPU found: running the CPU path (pure-PyTorch reference ops) on a small model")
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    model, tokenizer, name = load_model(args.model, device, dtype)
    ids = prompt_ids(tokenizer, model.config.vocab_size, args.context, args.batch, device)
    print(f"[quickstart] model={name} device={device} dtype={args.dtype} batch={args.batch} "
          f"context={args.context} new_tokens={args.new_tokens} budget={args.budget} page_size={args.page_size}")

    rows = []
    dense_tokens, dense_tps, dense_rates = timed_generate(model, ids, args.new_tokens, device, args.repeats)
    reference_logits = decode_logits(model, ids, dense_tokens)
    rows.append({"mode": "HF dense", "tokens_per_s": dense_tps, "timed_tokens_per_s": dense_rates, "kv_read": 1.0, "agreement": 1.0, "mean_kl": 0.0})

    for label, budget in (("tinyserve dense", "dense"), (f"tinyserve sparse ({args.budget})", args.budget)):
        tp.patch_model(model, token_budget=budget, page_size=args.page_size)
        tokens, tps, rates = timed_generate(model, ids, args.new_tokens, device, args.repeats)
        kv_read = tp.stats(model)["fraction_read"]
        logits = decode_logits(model, ids, dense_tokens)  # same prefixes as HF dense
        agreement = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
        rows.append({
            "mode": label, "tokens_per_s": tps, "timed_tokens_per_s": rates, "kv_read": kv_read, "agreement": agreement,
            "mean_kl": mean_kl(reference_logits, logits),
            "generated_equal": float((tokens == dense_tokens).float().mean()),
        })
    tp.unpatch_model(model)

    print(f"\n{'mode':<26}{'tokens/s':>10}{'speed-up':>10}{'KV read':>9}{'top-1 agree':>13}{'mean KL':>10}")
    for r in rows:
        kv = "n/a" if r["kv_read"] is None else f"{100 * r['kv_read']:.0f}%"
        print(f"{r['mode']:<26}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / dense_tps:>9.2f}x{kv:>9}"
              f"{100 * r['agreement']:>12.1f}%{r['mean_kl']:>10.4f}")
    print(f"\ntokens/s: median of {args.repeats} timed generate() calls (prompt + new tokens). "
          "KV read: fraction of the context's keys/values attended per decode step (all layers). "
          "Agreement and KL: next-token distributions vs HF dense on the same prefixes.")
    if args.json:
        env = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        Path(args.json).write_text(json.dumps({"args": vars(args), "env": env, "model": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
