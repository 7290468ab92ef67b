"""E2E NLG challenge metrics, computed offline.

The E2E challenge scores one system output per unique meaning representation (MR) against all
human references for that MR (2-40 per MR, varying), and reports five corpus-level numbers.
We follow the official script (tuetschek/e2e-metrics, ``measure_scores.py``) where we can
without its Perl and Stanford-CoreNLP dependencies:

- **BLEU** (0-100): ``sacrebleu.corpus_bleu`` with one reference stream per reference slot;
  groups with fewer references fill the missing slots with ``None``, which sacrebleu skips
  (variable reference counts are supported). ``tokenize="13a"``, ``lowercase=True``, like
  the script's mteval-v13a BLEU (case-insensitive, closest-reference brevity penalty).
- **NIST** (n=5): ``nltk.translate.nist_score.corpus_nist`` on the same lowercased
  13a tokens (sacrebleu's ``Tokenizer13a``), as mteval-v13a does.
- **METEOR**, **ROUGE-L**, **CIDEr**: pycocoevalcap's ``Meteor`` (METEOR 1.5 jar, ``-norm``),
  ``Rouge`` (multi-reference ROUGE-L: max precision and max recall over the references, then
  F with beta=1.2, averaged over MRs; exactly what the E2E script uses) and ``Cider``
  (CIDEr-D, idf from the evaluated references). The E2E script feeds these the output of
  the Stanford PTBTokenizer (lowercase, Penn-Treebank split, punctuation tokens dropped);
  we reproduce that with NLTK's data-free ``TreebankWordTokenizer`` (:func:`coco_tokenize`).

METEOR needs ``java``; when it is missing or the JVM fails, ``meteor`` is ``None`` and a
warning is logged, the other metrics are unaffected.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Sequence
from typing import Any

import sacrebleu
from nltk.tokenize import TreebankWordTokenizer
from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

logger = logging.getLogger(__name__)


METRIC_NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")


# Tokens the Stanford PTBTokenizer (as run by pycocoevalcap / the E2E script) removes.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", "(", ")", "{", "}", "[", "]",
     ".", "?", "!", ",", ":", "-", "--", "...", ";", "|"]
)


_TREEBANK = TreebankWordTokenizer()


_TOKENIZER_13A = Tokenizer13a()


# Treebank only splits the period at the very end of its input (it assumes one sentence);
# E2E texts hold several sentences, so split every period that ends a word first.
_SENTENCE_PERIOD = re.compile(r"\.(?=\s|$)")


def group_references(groups: Sequence[str], texts: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Collect the texts of each group: unique groups in first-seen order and their references.

    >>> group_references(["a", "b", "a"], ["x", "y", "z"])
    (['a', 'b'], [['x', 'z'], ['y']])
    """
    if len(groups) != len(texts):
        raise ValueError(f"groups ({len(groups)}) and texts ({len(texts)}) differ in length")
    refs_by_group: dict[str, list[str]] = {}
    for group, text in zip(groups, texts):
        refs_by_group.setdefault(group, []).append(text)
    return list(refs_by_group), list(refs_by_group.values())


def coco_tokenize(text: str) -> str:
    """Lowercase, Penn-Treebank tokenise and drop punctuation tokens, space-joined.

    Stands in for the Stanford PTBTokenizer the E2E script runs before METEOR/ROUGE-L/CIDEr.
    ``"It's family-friendly."`` -> ``"it 's family-friendly"``.
    """
    text = _SENTENCE_PERIOD.sub(" . ", text.lower().replace("|||", " "))
    return " ".join(tok for tok in _TREEBANK.tokenize(text) if tok not in _PTB_PUNCTUATION)


def mteval_tokenize(text: str) -> list[str]:
    """Lowercased mteval-v13a tokens (the tokenisation behind BLEU and NIST)."""
    return _TOKENIZER_13A(text.strip().lower()).split()


def e2e_metrics(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, meteor: bool = True
) -> dict[str, float | None]:
    """Corpus-level E2E scores of one hypothesis per input against that input's references.

    Args:
        hypotheses: ``N`` system outputs, one per unique input.
        references: ``N`` non-empty lists of reference texts; list lengths may differ.
        meteor: run METEOR; it starts a JVM (a few seconds), so quick in-training checks
            may turn it off, reporting ``None``.

    Returns:
        ``{"bleu": 0-100, "nist": >=0, "meteor": 0-1 or None, "rouge_l": 0-1, "cider": >=0}``.
    """
    if len(hypotheses) == 0:
        raise ValueError("e2e_metrics needs at least one hypothesis")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if isinstance(references, str) or any(isinstance(refs, str) for refs in references):
        raise ValueError("references must be a sequence of lists of strings, one list per hypothesis")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")

    scores: dict[str, float | None] = {
        "bleu": _bleu(hypotheses, references),
        "nist": _nist(hypotheses, references),
    }
    # pycocoevalcap scorers take {id: [tokenised text, ...]} dicts.
    res = {i: [coco_tokenize(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [coco_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    scores["meteor"] = _meteor(gts, res) if meteor else None
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in METRIC_NAMES}


def _bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    # sacrebleu wants reference *streams* (slot j of every segment); pad short lists with None.
    num_slots = max(len(refs) for refs in references)
    streams: list[list[str | None]] = [
        [refs[j] if j < len(refs) else None for refs in references] for j in range(num_slots)
    ]
    result = sacrebleu.corpus_bleu(
        list(hypotheses), streams, lowercase=True, tokenize="13a"  # type: ignore[arg-type]
    )
    return float(result.score)


def _nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    hyp_tokens = [mteval_tokenize(h) for h in hypotheses]
    ref_tokens = [[mteval_tokenize(r) for r in refs] for refs in references]
    try:
        score = corpus_nist(ref_tokens, hyp_tokens, n=5)
    except ZeroDivisionError:
        # nltk divides by the hypothesis n-gram count; all-empty (or 1-token) output scores 0.
        return 0.0
    return float(score) if math.isfinite(score) else 0.0


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
    """METEOR 1.5 via pycocoevalcap's jar wrapper; ``None`` (and a warning) if it cannot run."""
    if shutil.which("java") is None:
        logger.warning("METEOR skipped: `java` is not on PATH")
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
    except Exception as err:  # noqa: BLE001 - any start-up failure means "no METEOR"
        logger.warning("METEOR skipped: could not start the METEOR jar (%s)", err)
        return None
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except Exception as err:  # noqa: BLE001 - a dead JVM shows up as an empty line / bad float
        logger.warning("METEOR failed, reported as None (%s)", err)
        return None
    finally:
        _close_meteor(scorer)


def _close_meteor(scorer: Any) -> None:
    """Stop the METEOR JVM now rather than at garbage collection, so no java process lingers.

    pycocoevalcap's ``__del__`` takes the scorer's lock, which ``compute_score`` leaves held if
    it raised; release it so that ``__del__`` cannot deadlock later.
    """
    proc = scorer.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    proc.kill()
    proc.wait()
    if scorer.lock.locked():
        scorer.lock.release()
