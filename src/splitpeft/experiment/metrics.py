"""E2E NLG challenge metrics, computed offline.

The E2E challenge scores one system output per unique meaning representation (MR) against all
human references for that MR (2-40 per MR, varying), and reports five corpus-level numbers.
We follow the official script (tuetschek/e2e-metrics, ``measure_scores.py``) without its Perl and
Stanford-CoreNLP dependencies; ``tests/experiment/test_metrics.py`` checks all five numbers
against the script's on a generated set of 60 MRs:

- **BLEU** (0-100): ``sacrebleu.corpus_bleu`` with one reference stream per reference slot;
  groups with fewer references fill the missing slots with ``None``, which sacrebleu skips
  (variable reference counts are supported), on :func:`mteval_tokenize` tokens: the script's
  mteval-v13a BLEU (case-insensitive, closest-reference brevity penalty, the same smoothing).
- **NIST** (n=5): written here (:func:`nist`), following mteval-v13a's definition, which the
  script runs: information weights from the n-gram counts of *all* references of the corpus,
  each hypothesis n-gram clipped to its largest count in any one reference of its input, and
  the length penalty from the mean reference length. ``nltk``'s ``corpus_nist`` scores each
  reference separately and keeps the best one per n-gram order (and takes the length of that
  reference), which gave 6.22 where the script gives 7.82 on its own example files; no
  library we know implements mteval's version.
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
from collections import Counter
from collections.abc import Sequence
from typing import Any

import sacrebleu
from nltk.tokenize import TreebankWordTokenizer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

logger = logging.getLogger(__name__)


METRIC_NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")


# Tokens the Stanford PTBTokenizer (as run by pycocoevalcap / the E2E script) removes.
# The list is pycocoevalcap's and holds "-LRB-" etc. in upper case, but the tokenizer runs with
# -lowerCase, so the brackets survive as "-lrb-" ... in what the E2E script scores.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "|"]
)


_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


# PTBTokenizer's default normalizeCurrency: the pound sign becomes "#" and the euro "$" (the old
# WSJ treebank knows no others), each split from the amount; E2E prices are "less than £20".
_PTB_CURRENCY = str.maketrans({"£": " # ", "€": " $ ", "¥": " ¥ "})


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

    Stands in for the Stanford PTBTokenizer (CoreNLP 3.4.1) the E2E script runs before
    METEOR/ROUGE-L/CIDEr, including its currency and bracket normalisation:
    ``"It's family-friendly (£20-25)."`` -> ``"it 's family-friendly -lrb- # 20-25 -rrb-"``.
    Known differences, absent from E2E texts: PTB keeps the period of abbreviations
    (``"St."``) and drops a word-initial single quote (``"'single'"``).
    """
    text = _SENTENCE_PERIOD.sub(" . ", text.lower().replace("|||", " ").translate(_PTB_CURRENCY))
    tokens = (_PTB_BRACKETS.get(tok, tok) for tok in _TREEBANK.tokenize(text))
    return " ".join(tok for tok in tokens if tok not in _PTB_PUNCTUATION)


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a tokens, lowercased (the tokenisation behind BLEU and NIST).

    sacrebleu's ``Tokenizer13a`` is mteval's ``tokenization``; mteval then lowercases ASCII
    letters only (``tr/[A-Z]/[a-z]/``), which ``str.lower`` would not match on e.g. ``"É"``.
    ``"Fitzbillies' price range is £20-25."`` -> ``["fitzbillies", "'", "price", ..., "£20", "-", "25", "."]``.
    """
    return _TOKENIZER_13A(text.strip()).translate(_ASCII_LOWER).split()


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


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
        [_mteval_text(refs[j]) if j < len(refs) else None for refs in references] for j in range(num_slots)
    ]
    result = sacrebleu.corpus_bleu(
        # force: the text is tokenised on purpose (mteval's rules, above), which sacrebleu would warn about
        [_mteval_text(h) for h in hypotheses], streams, tokenize="none", force=True  # type: ignore[arg-type]
    )
    return float(result.score)


def _mteval_text(text: str) -> str:
    return " ".join(mteval_tokenize(text))


NIST_ORDER = 5


def nist(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         order: int = NIST_ORDER) -> float:
    """Corpus NIST (Doddington 2002) of tokenised hypotheses, as mteval-v13a computes it.

    With ``count(w_1..w_n)`` the occurrences of an n-gram in all references of the corpus and
    ``W`` their total word count, the information of an n-gram is
    ``info(w_1..w_n) = log2(count(w_1..w_{n-1}) / count(w_1..w_n))`` (``W`` in place of the
    empty prefix). Then::

        NIST = sum_{n=1..order} [ sum_segments sum_{n-grams g of hyp} info(g) * min(c_hyp(g), max_ref c_ref(g))
                                  / sum_segments (len(hyp) - n + 1)^+ ]
               * exp(-beta * log(min(1, L_hyp / L_ref))^2),   beta = -log(0.5) / log(1.5)^2

    where ``max_ref c_ref(g)`` is ``g``'s largest count in any one reference of that segment,
    ``L_hyp`` the total hypothesis words and ``L_ref`` the total reference words divided by
    the mean number of (non-empty) references per segment. The penalty is 0.5 at
    ``L_hyp / L_ref = 2/3`` and 1 from 1 on.

    Args:
        hypotheses: ``N`` token lists.
        references: ``N`` lists of reference token lists (lengths may differ).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    info = _information_weights([ref for refs in references for ref in refs], order)
    matched_info = [0.0] * order  # per n-1: sum of info(g) * clipped count
    hyp_ngrams = [0] * order  # per n-1: hypothesis n-grams
    for hyp, refs in zip(hypotheses, references):
        clip: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            clip |= _ngram_counts(ref, order)  # | keeps the larger count of each n-gram
        for gram, count in _ngram_counts(hyp, order).items():
            if gram in clip:
                matched_info[len(gram) - 1] += info[gram] * min(count, clip[gram])
        for n in range(1, order + 1):
            hyp_ngrams[n - 1] += max(len(hyp) - n + 1, 0)
    ref_words = sum(len(ref) for refs in references for ref in refs)
    num_refs = sum(1 for refs in references for ref in refs if ref)  # mteval skips empty references
    if num_refs == 0:
        return 0.0
    mean_ref_words = ref_words / (num_refs / len(hypotheses))
    score = sum(matched / max(total, 1) for matched, total in zip(matched_info, hyp_ngrams))
    return score * _nist_length_penalty(hyp_ngrams[0] / mean_ref_words)


def _ngram_counts(tokens: Sequence[str], order: int) -> Counter[tuple[str, ...]]:
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1)
    )


def _information_weights(references: Sequence[Sequence[str]], order: int) -> dict[tuple[str, ...], float]:
    counts: Counter[tuple[str, ...]] = Counter()
    for ref in references:
        counts.update(_ngram_counts(ref, order))
    total_words = sum(len(ref) for ref in references)
    info = {}
    for gram, count in counts.items():
        prefix = gram[:-1]
        # mteval tests the prefix string for truth, and Perl's "0" is false: a prefix that is
        # the single token "0" is divided by the word total like a unigram. Kept to match it.
        whole = counts[prefix] if prefix and prefix != ("0",) else total_words
        info[gram] = math.log2(whole / count)
    return info


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def _nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return nist([mteval_tokenize(h) for h in hypotheses], [[mteval_tokenize(r) for r in refs] for refs in references])


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
