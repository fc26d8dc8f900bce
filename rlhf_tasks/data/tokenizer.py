"""The tiny default model's tokenizer: a byte-level BPE trained on the bundled samples."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .formats import SCHEMAS, SEED_DATASETS, normalise
from .loading import SAMPLES_DIR

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2048,
                         model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, nothing maps to ``<unk>``) with ``<pad>``, ``<s>``,
    ``</s>``, ``<unk>`` as ids 0-3. No BOS is added automatically: ``tok("x")`` is just
    the text's tokens, the case the data pipeline must handle besides BOS-adding ones."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def sample_texts() -> Iterator[str]:
    """Every normalised prompt and answer of the four bundled samples, in a fixed order."""
    for hub_id in SEED_DATASETS:
        schema = SCHEMAS[hub_id]
        files = sorted((SAMPLES_DIR / hub_id / "data").glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no bundled sample of {hub_id} under {SAMPLES_DIR}: "
                                    "run `python -m rlhf_tasks.data.samples.generate`")
        for path in files:
            for row in pq.read_table(path, columns=list(schema.columns)).to_pylist():
                triple, _ = normalise(schema, row)
                if triple is not None:
                    yield from triple
