"""Defences a device applies to what it sends across the cut (Gaussian release with clipping, NoPeek)
and the (epsilon, delta) of the release from dp-accounting.

Public API (each name imported from its module on first use):

- `cut`: `Defence`, `clip_rows`, `distance_correlation`
- `accounting`: `gaussian_release_epsilon`, `accountant_name`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.defences.accounting import accountant_name as accountant_name
    from splitpeft.defences.accounting import gaussian_release_epsilon as gaussian_release_epsilon
    from splitpeft.defences.cut import Defence as Defence
    from splitpeft.defences.cut import clip_rows as clip_rows
    from splitpeft.defences.cut import distance_correlation as distance_correlation

_EXPORTS = {
    "Defence": "splitpeft.defences.cut",
    "clip_rows": "splitpeft.defences.cut",
    "distance_correlation": "splitpeft.defences.cut",
    "gaussian_release_epsilon": "splitpeft.defences.accounting",
    "accountant_name": "splitpeft.defences.accounting",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
