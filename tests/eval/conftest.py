"""Fixtures of the eval tests: a tiny random-weight Llama and a locally trained byte-level BPE tokenizer,
saved with save_pretrained into a temporary directory (nothing touches the HF hub)."""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TRAIN_TEXT = [
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.",
    "I will quiz you about the important information there. What is the pass key? The pass key is",
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 12345. Remember it. 67890 is the pass key. 0123456789",
    "Some special magic numbers are hidden within the following text. Make sure to memorize it.",
    "One of the special magic numbers for amber-anchor is: 1234567. What are all the numbers?",
    "def main(argv):\n    return parse(argv)\n\nclass Config:\n    value = 1\n",
]


def build_tiny_model(path) -> str:
    """Save a 2-layer Llama (hidden 64, 4 heads / 2 KV heads) and a ~300-token BPE tokenizer to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )
    fast.save_pretrained(path)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def _memoized_task_index():
    """lm-eval indexes its ~15K task yamls (about 10 s here) for every TaskManager: once per session."""
    from lm_eval.tasks._index import TaskIndex

    original = TaskIndex.build
    memo: dict = {}

    def build(paths, **kwargs):
        paths = list(paths)
        key = (tuple(str(p) for p in paths), tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = original(paths, **kwargs)
        return dict(memo[key])

    mp = pytest.MonkeyPatch()
    mp.setattr(TaskIndex, "build", staticmethod(build))
    yield
    mp.undo()
