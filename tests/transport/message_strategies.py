"""Hypothesis strategies for messages: every dtype the wire carries, names and metadata with the
characters JSON must escape, 0-d, empty, odd and non-contiguous shapes."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from splitpeft.transport.compression import SCALE_SUFFIX
from splitpeft.transport.messages import Kind, Message

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.int8,
          torch.float64, torch.int16, torch.uint8, torch.bool)
# Any Unicode but lone surrogates (no UTF-8 for those): quotes, backslashes, control characters,
# multi-byte characters; never a name compress refuses or safetensors' own key.
NAMES = st.text(st.characters(codec="utf-8"), max_size=30).filter(
    lambda name: not name.endswith(SCALE_SUFFIX) and name != "__metadata__")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
META = st.dictionaries(st.text().filter(lambda key: key != "compression"), JSON, max_size=4)
SHAPES = st.lists(st.integers(0, 6), max_size=4) | st.tuples(st.integers(0, 3000))  # 0-d, empty, odd, long


def random_tensor(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Finite random values of `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    low = 0 if dtype == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=generator).to(dtype)


@st.composite
def tensors(draw, dtypes=DTYPES) -> torch.Tensor:
    value = random_tensor(draw(SHAPES), draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**31)))
    if value.dim() >= 2 and draw(st.booleans()):
        value = value.transpose(0, 1)  # not contiguous: encode packs it
    return value


@st.composite
def messages(draw, kind: Kind | None = None, dtypes=DTYPES) -> Message:
    kind = draw(st.sampled_from(Kind)) if kind is None else kind
    return Message(kind, draw(st.dictionaries(NAMES, tensors(dtypes), max_size=12)), draw(META))
