"""Captioning metrics as the COCO caption evaluation computes them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

    from capfilt.eval.caption_metrics import score_captions
    score_captions({"img1": "a dog runs"}, {"img1": ["A dog is running.", "a brown dog"]})
    # {"bleu1": ..., "bleu4": ..., "cider": ..., "rouge_l": ..., "meteor": ..., "n_images": 1, ...}

The scorers are the reference ones from ``pycocoevalcap`` (the ``eval`` extra): its BLEU (``closest``
reference length, corpus level), CIDEr (which is CIDEr-D: sigma 6, clipped counts, x10), ROUGE-L
(beta 1.2) and its METEOR 1.5 jar. Published caption numbers are only comparable when computed by that
code on text tokenised by the Stanford PTB tokenizer (lower-cased, punctuation tokens dropped), so
this module calls it rather than re-implementing it, and adds only what it lacks:

* **Tokenisation without writing into site-packages.** ``pycocoevalcap``'s ``PTBTokenizer`` writes its
  input to a temporary file beside its jar (fails on a read-only install) and misaligns captions if one
  contains a line break (``\\r``, U+2028, ...). We run the same jar with the same flags on stdin after
  collapsing whitespace, then drop the same punctuation tokens.
* **A pure-Python tokenizer** used when Java is absent (``tokenizer="auto"``) or on request
  (``"python"``). It follows the PTB rules that matter for captions (clitics, ``n't``, abbreviations,
  acronyms, hyphenated words, numbers); on the 4,982-image MAGIC reference set 3 of 29,892 captions
  come out differently and BLEU, ROUGE-L and CIDEr agree with the Java tokenizer's to 1e-4 points.
  Results say which tokenizer ran.
* **METEOR that fails gracefully.** METEOR needs Java and ~2 GB of heap; when it is not available,
  crashes or exceeds its time limit, ``meteor`` is ``None`` and ``notes`` says why, and the other
  metrics are still returned. (``pycocoevalcap``'s wrapper keeps its lock held when it raises, which
  makes its ``__del__`` block forever; we override that ``__del__`` and stop the JVM ourselves.)

All scores are percentages (x100). CIDEr-D's IDF comes from the references of the images scored, so
CIDEr depends on the evaluated set as a whole, as in the COCO evaluation.
Speed (2 CPU cores, 4,982 images x 5 references): tokenising ~2 s, BLEU+CIDEr+ROUGE ~8 s, METEOR
~25 s (half of it loading its paraphrase table, which overlaps with the other metrics).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("capfilt.eval.caption_metrics")

METRICS = ("bleu", "cider", "meteor", "rouge")
"""Metric families ``score_captions`` knows. Result keys: bleu1..bleu4, cider, meteor, rouge_l."""

TOKENIZERS = ("auto", "java", "python")

# Punctuation tokens dropped after PTB tokenisation: pycocoevalcap's list, copied so that the Python
# tokenizer works without the package. The bracket tokens are upper case while the tokenizer's
# output is lower-cased, so "-lrb-" etc. survive in the reference evaluation; we keep that quirk.
_PUNCTUATIONS = frozenset("'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;".split())

_INSTALL_HINT = "caption metrics need pycocoevalcap: pip install 'capfilt[eval]'"


class CaptionMetricsError(RuntimeError):
    """A tokenizer or scorer could not run (and no fallback was allowed)."""


def caption_metrics_available() -> bool:
    """Whether pycocoevalcap (the ``eval`` extra) is installed: BLEU, CIDEr-D and ROUGE-L need it."""
    return importlib.util.find_spec("pycocoevalcap") is not None


CAPTION_METRICS_MISSING = (
    f"{_INSTALL_HINT} (BLEU, CIDEr-D and ROUGE-L are left out; the rest is evaluated)"
)
"""What an evaluation that goes on without pycocoevalcap says, in the log and in its notes."""


# ---------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed by the PTB tokenizer jar and METEOR)."""
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> Path:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CaptionMetricsError(_INSTALL_HINT) from exc
    return Path(ptb.__file__).resolve().parents[1]


def _collapse_ws(text: str) -> str:
    # str.split() also splits on \r, \x85, U+2028..., which Java treats as line ends: collapsing them
    # keeps exactly one output line per caption.
    return " ".join(text.split())


def _drop_punctuation(line: str) -> str:
    # Same filter as pycocoevalcap (split on ' ' only, so tokens holding a no-break space survive).
    return " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS)


def _java_ptb_tokenize(texts: Sequence[str], timeout: float) -> list[str]:
    """Stanford PTB tokenizer 3.4.1 (the jar shipped with pycocoevalcap), fed on stdin."""
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise CaptionMetricsError(f"PTB tokenizer jar not found at {jar}")
    lines = [_collapse_ws(t) for t in texts]
    # Java drops a trailing empty line, so blank captions are not sent at all (they tokenise to "").
    todo = [i for i, line in enumerate(lines) if line]
    out = [""] * len(lines)
    if not todo:
        return out
    cmd = [
        "java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines", "-lowerCase", "-encoding", "utf-8",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd,
            input="\n".join(lines[i] for i in todo).encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CaptionMetricsError(f"PTB tokenizer did not run: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise CaptionMetricsError(f"PTB tokenizer exited with {proc.returncode}: {' | '.join(err)}")
    got = proc.stdout.decode("utf-8").split("\n")
    if len(got) == len(todo) + 1 and got[-1] == "":
        got.pop()
    if len(got) != len(todo):
        raise CaptionMetricsError(
            f"PTB tokenizer returned {len(got)} lines for {len(todo)} captions"
        )
    for i, line in zip(todo, got, strict=True):
        out[i] = _drop_punctuation(line)
    return out


# --- Pure-Python approximation of the PTB tokenizer --------------------------------------------------

# Abbreviations whose final period the PTB tokenizer keeps (the subset seen in captions; "no.", "lb."
# and "oz." are split by it, so they are not here).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st ave blvd rd jr sr prof mt ft etc vs inc co corp ltd bros gen gov sen rep capt "
    "sgt lt col cmdr adm jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# PTB splits these single words in two.
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTE_MAP = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--", "\u2014": "--"}
)

# Clitics and "n't" become tokens of their own ("can't" -> "ca n't", "man's" -> "man 's").
_NT_RE = re.compile(r"(?<=\w)n't\b")
_CLITIC_RE = re.compile(r"(?<=\w)'(s|m|d|re|ve|ll)\b")
_TOKEN_RE = re.compile(
    r"""
    (?P<word>\w+(?:(?:[-./&']|(?<=\d)[,:](?=\d))\w+)*)  # t-shirt, t.v, o'clock, n't, 1,000, 6:30, 1/2
        (?P<dot>\.(?!\w))?                          # a final period: kept only for acronyms/abbrevs
    | '(?:s|m|d|re|ve|ll)\b                         # clitics split off above
    | \.{3,} | --+ | [?!]+                           # "...", "--", "!?" stay one token
    | \S                                            # anything else: one character per token
    """,
    re.VERBOSE,
)
_ACRONYM_RE = re.compile(r"^(?:[^\W\d_]\.)*[^\W\d_]$")  # u.s / t.v / a single letter


def _python_ptb_line(text: str) -> str:
    text = _collapse_ws(text.translate(_QUOTE_MAP)).lower()
    text = _CLITIC_RE.sub(r" '\1", _NT_RE.sub(" n't", text))
    tokens: list[str] = []
    open_quote = True
    for m in _TOKEN_RE.finditer(text):
        word = m.group("word")
        if word is None:
            tok = m.group(0)
            if tok == '"':  # PTB turns straight double quotes into `` and '' alternately
                tok, open_quote = ("``" if open_quote else "''"), not open_quote
            tokens.append(_BRACKETS.get(tok, tok))
            continue
        tokens.extend(_SPLIT_WORDS.get(word, word).split())
        if m.group("dot"):
            if word in _ABBREVIATIONS or _ACRONYM_RE.match(word):
                tokens[-1] += "."
            else:
                tokens.append(".")
    return _drop_punctuation(" ".join(tokens))


def python_ptb_tokenize(texts: Iterable[str]) -> list[str]:
    """Pure-Python approximation of the COCO-evaluation PTB tokenisation (lower-cased, punctuation dropped)."""
    return [_python_ptb_line(t) for t in texts]


def ptb_tokenize(
    texts: Sequence[str], tokenizer: str = "auto", timeout: float = 300.0
) -> tuple[list[str], str, list[str]]:
    """Tokenise captions as the COCO caption evaluation does.

    ``tokenizer``: ``"java"`` (the Stanford PTB jar; error if it cannot run), ``"python"`` (the
    approximation) or ``"auto"`` (Java when available, else Python). Returns the space-joined tokens,
    the backend that ran (``"java"`` or ``"python"``) and notes about any fallback.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    notes: list[str] = []
    if tokenizer in ("auto", "java"):
        if not java_available():
            if tokenizer == "java":
                raise CaptionMetricsError("tokenizer='java' but no java executable is on PATH")
            notes.append(
                "java not found: used the Python PTB tokenizer (scores may differ slightly)"
            )
        else:
            try:
                return _java_ptb_tokenize(texts, timeout), "java", notes
            except CaptionMetricsError as exc:
                if tokenizer == "java":
                    raise
                notes.append(f"{exc}; used the Python PTB tokenizer (scores may differ slightly)")
    for note in notes:
        log.warning(note)
    return python_ptb_tokenize(texts), "python", notes


# ---------------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------------


class _MeteorRun:
    """pycocoevalcap's METEOR 1.5 wrapper, started early, with a time limit and clean failure.

    Starting it in ``__init__`` lets the JVM load its paraphrase table (~12 s) while the other
    metrics are being computed.
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        class _Meteor(Meteor):
            # The parent's __del__ blocks forever on the lock compute_score leaves held when it
            # raises, and raises itself on a dead pipe; close() below does its job instead.
            def __del__(self) -> None:
                pass

        self._meteor = _Meteor()  # spawns the JVM; OSError when java cannot be started
        self._stderr_tail = ""

    def score(self, gts: dict[int, list[str]], res: dict[int, list[str]], timeout: float) -> float:
        proc = self._meteor.meteor_p
        fired = threading.Event()

        def _kill() -> None:
            # A stuck JVM is killed; the wrapper's blocked readline then returns b"" and it raises.
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, _kill)
        timer.daemon = True
        timer.start()
        try:
            score, _ = self._meteor.compute_score(gts, res)
            return float(score)
        except Exception as exc:
            self.close()
            why = (
                f"timed out after {timeout:g} s"
                if fired.is_set()
                else f"{type(exc).__name__}: {exc}"
            )
            tail = f": {self._stderr_tail}" if self._stderr_tail else ""
            raise CaptionMetricsError(f"METEOR failed ({why}){tail}") from exc
        finally:
            timer.cancel()
            self.close()

    def close(self) -> None:
        """Stop the JVM and close its pipes (idempotent); keeps the end of its stderr for messages."""
        proc = self._meteor.meteor_p
        try:
            proc.stdin.close()
        except OSError:  # BrokenPipeError when the JVM died with input still buffered
            pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if not proc.stderr.closed:
            err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            self._stderr_tail = " | ".join(err[-3:])
            proc.stderr.close()
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = METRICS,
    *,
    tokenizer: str = "auto",
    meteor_timeout: float = 600.0,
) -> dict[str, Any]:
    """Score one predicted caption per image against that image's reference captions.

    Images are those of ``predictions`` (as COCOEvalCap scores the images of the result file); each
    needs at least one reference. References of other images are ignored.

    Returns percentages (x100) under ``bleu1``..``bleu4``, ``cider`` (CIDEr-D), ``rouge_l`` and
    ``meteor`` for the requested ``metrics`` (``meteor`` is ``None`` when METEOR could not run), plus
    ``n_images``, ``tokenizer`` (``"java"`` or ``"python"``) and ``notes`` (list of strings saying
    what was skipped or replaced and why). Everything is JSON-serialisable.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(METRICS)}")
    if not predictions:
        raise ValueError("no predictions to score")
    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(
            f"{len(missing)} prediction(s) have no reference captions, e.g. {missing[:3]}"
        )
    for i in ids:
        texts = [predictions[i], *references[i]]
        if not all(isinstance(t, str) for t in texts) or isinstance(references[i], str):
            raise TypeError(f"image {i!r}: prediction must be a str and references a list of str")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise CaptionMetricsError(_INSTALL_HINT) from exc

    notes: list[str] = []
    meteor: _MeteorRun | None = None
    if "meteor" in metrics:
        if not java_available():
            notes.append("METEOR skipped: it needs Java and no java executable is on PATH")
        else:
            try:
                meteor = _MeteorRun()
            except OSError as exc:
                notes.append(f"METEOR skipped: could not start Java ({exc})")

    try:
        # One tokenizer call for everything: each JVM start costs ~0.5 s.
        flat = [predictions[i] for i in ids] + [r for i in ids for r in references[i]]
        tokens, backend, tok_notes = ptb_tokenize(flat, tokenizer)
        notes.extend(tok_notes)
        res: dict[int, list[str]] = {k: [tokens[k]] for k in range(len(ids))}
        gts: dict[int, list[str]] = {}
        pos = len(ids)
        for k, i in enumerate(ids):
            n = len(references[i])
            gts[k] = tokens[pos : pos + n]
            pos += n

        out: dict[str, Any] = {}
        if "bleu" in metrics:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({f"bleu{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)})
        if "cider" in metrics:
            out["cider"] = 100.0 * float(Cider().compute_score(gts, res)[0])
        if "rouge" in metrics:
            out["rouge_l"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
        if "meteor" in metrics:
            out["meteor"] = None
            if meteor is not None:
                try:
                    out["meteor"] = 100.0 * meteor.score(gts, res, meteor_timeout)
                except CaptionMetricsError as exc:
                    notes.append(f"{exc}; meteor left out")
    finally:
        if meteor is not None:
            meteor.close()
    for note in notes:
        if note not in tok_notes:  # already logged by ptb_tokenize
            log.warning(note)
    out.update({"n_images": len(ids), "tokenizer": backend, "notes": notes})
    return out
