"""Experiments: a whole run and its folder, evaluation (perplexity, generation, E2E metrics), reports
and plots, and side-by-side comparisons over seeds.

Public API (each name imported from its module on first use):

- `run`: `run_experiment`, `evaluate_model`, `RunFolderError`, `EvaluationError`
- `compare`: `run_comparison`, `SUITES`
- `evaluation`: `perplexity`, `generate`, `evaluate_generation`
- `metrics`: `e2e_metrics`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.experiment.compare import SUITES as SUITES
    from splitpeft.experiment.compare import run_comparison as run_comparison
    from splitpeft.experiment.evaluation import evaluate_generation as evaluate_generation
    from splitpeft.experiment.evaluation import generate as generate
    from splitpeft.experiment.evaluation import perplexity as perplexity
    from splitpeft.experiment.metrics import e2e_metrics as e2e_metrics
    from splitpeft.experiment.run import EvaluationError as EvaluationError
    from splitpeft.experiment.run import RunFolderError as RunFolderError
    from splitpeft.experiment.run import evaluate_model as evaluate_model
    from splitpeft.experiment.run import run_experiment as run_experiment

_EXPORTS = {
    "run_experiment": "splitpeft.experiment.run",
    "evaluate_model": "splitpeft.experiment.run",
    "RunFolderError": "splitpeft.experiment.run",
    "EvaluationError": "splitpeft.experiment.run",
    "run_comparison": "splitpeft.experiment.compare",
    "SUITES": "splitpeft.experiment.compare",
    "perplexity": "splitpeft.experiment.evaluation",
    "generate": "splitpeft.experiment.evaluation",
    "evaluate_generation": "splitpeft.experiment.evaluation",
    "e2e_metrics": "splitpeft.experiment.metrics",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
