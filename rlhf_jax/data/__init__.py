"""Data: synthetic tasks, batching and deterministic, checkpointable, per-host iteration.

Nothing here imports model code.
"""

from rlhf_jax.data.iterator import BatchIterator, stack_examples, synthetic_sft_iterator
from rlhf_jax.data.synthetic import (
    BOS_ID,
    DIGIT_IDS,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    SFT_BATCH_KEYS,
    SPECIAL_TOKENS,
    TASKS,
    VOCAB_SIZE,
    decode,
    encode,
    expected_completion,
    is_correct,
    make_prompt,
    make_sft_batch,
    make_sft_example,
    synthetic_sft_batch,
)

__all__ = [
    "BOS_ID",
    "BatchIterator",
    "DIGIT_IDS",
    "EOS_ID",
    "PAD_ID",
    "SEP_ID",
    "SFT_BATCH_KEYS",
    "SPECIAL_TOKENS",
    "TASKS",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "expected_completion",
    "is_correct",
    "make_prompt",
    "make_sft_batch",
    "make_sft_example",
    "stack_examples",
    "synthetic_sft_batch",
    "synthetic_sft_iterator",
]

# Local-file readers, user data sources and tokenisation (tfds builders: `rlhf_jax.data.tfds_builders`, imported
# on demand so that `import rlhf_jax.data` does not import tensorflow_datasets).
from rlhf_jax.data.formats import (  # noqa: E402
    FORMATS,
    DataError,
    load_examples,
    read_examples,
    stats_metrics,
    write_sample_files,
)
from rlhf_jax.data.sources import (  # noqa: E402
    BadRowsError,
    detect_file_format,
    detect_format,
    load_dataset,
    resolve_files,
)
from rlhf_jax.data.tokenize import (  # noqa: E402
    TRUNCATIONS,
    make_collate,
    pack_rows,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
    tokenize_steps,
    tokenize_unpaired,
    warn_if_truncated,
)

__all__ += [
    "BadRowsError",
    "DataError",
    "FORMATS",
    "TRUNCATIONS",
    "detect_file_format",
    "detect_format",
    "load_dataset",
    "load_examples",
    "make_collate",
    "pack_rows",
    "read_examples",
    "resolve_files",
    "stats_metrics",
    "tokenize_pairs",
    "tokenize_prompts",
    "tokenize_ranked",
    "tokenize_sft",
    "tokenize_steps",
    "tokenize_unpaired",
    "warn_if_truncated",
    "write_sample_files",
]
