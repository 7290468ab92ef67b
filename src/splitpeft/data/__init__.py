"""Data: examples and their sources (E2E, JSONL, text, Hugging Face, the built-in task), held-out split
and partitions over devices, tokenising and resumable batch streams.

Public API (each name imported from its module on first use):

- `examples`: `Example`, `DataError`
- `sources`: `load_examples`
- `builtin`: `builtin_examples`
- `partition`: `split_by_group` (and `partition.partition`, named as its module)
- `batching`: `encode`, `EncodedExample`, `Batch`, `BatchStream`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.data.batching import Batch as Batch
    from splitpeft.data.batching import BatchStream as BatchStream
    from splitpeft.data.batching import EncodedExample as EncodedExample
    from splitpeft.data.batching import encode as encode
    from splitpeft.data.builtin import builtin_examples as builtin_examples
    from splitpeft.data.examples import DataError as DataError
    from splitpeft.data.examples import Example as Example
    from splitpeft.data.partition import split_by_group as split_by_group
    from splitpeft.data.sources import load_examples as load_examples

_EXPORTS = {
    "Example": "splitpeft.data.examples",
    "DataError": "splitpeft.data.examples",
    "load_examples": "splitpeft.data.sources",
    "builtin_examples": "splitpeft.data.builtin",
    "split_by_group": "splitpeft.data.partition",
    "encode": "splitpeft.data.batching",
    "EncodedExample": "splitpeft.data.batching",
    "Batch": "splitpeft.data.batching",
    "BatchStream": "splitpeft.data.batching",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
