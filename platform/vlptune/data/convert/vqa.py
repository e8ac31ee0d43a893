"""VQA v2 into the ``vqa`` table of a converted COCO root (the images stay stored once, in the root).

Inputs: ``v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015}_questions.json``
(``questions[]{image_id, question, question_id}``) and, for train / val,
``v2_mscoco_{train2014,val2014}_annotations.json`` (``annotations[]{question_id,
answers[10]{answer}, multiple_choice_answer, answer_type}``). The split comes
from the file name (``test-dev2015`` -> ``test_dev``, questions without answers).

* answers are normalised as the official VQA evaluation does
  (:func:`normalize_answer`: punctuation, number words to digits, articles
  dropped, common contractions restored);
* soft scores (``score``): ``table`` (default) gives 0 / 0.3 / 0.6 / 0.9 / 1.0
  for 0 / 1 / 2 / 3 / 4+ of the 10 annotators: exactly the official metric
  (min(1, matches/3) averaged over the 10 leave-one-out subsets), as UNITER,
  ViLT and METER train with; ``min3`` gives min(1, matches/3) itself;
* the answer vocabulary (manifest ``vocabularies.vqa_answers``, most frequent
  first): normalised answers given at least ``min_answer_count`` times over the
  train and val annotations (9, the common setting, gives the 3,129 answers of
  the papers on the full data); answers outside it are left out of a question's
  list (counted as the fix ``answer_outside_vocabulary``);
* a train / val question without an annotation, or whose annotation has no
  answers, is dropped (``no_answers``); a question about an image the root
  does not hold is dropped (``unknown_image``); a repeated question id
  (``duplicate_id``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlptune.data.convert.captioned import load_json, require_keys
from vlptune.data.convert.report import Report
from vlptune.data.schema import DataError

DEFAULT_MIN_ANSWER_COUNT = 9
VOCABULARY_KEY = "vqa_answers"  # manifest vocabularies key of the answer vocabulary
SCORE_TABLE = (0.0, 0.3, 0.6, 0.9, 1.0)  # by matches among the 10 answers, 4 and more: 1.0
SCORE_MODES = ("table", "min3")
MIN3_MATCHES = 3
VQA_SPLIT_RE = re.compile(r"(train2014|val2014|test-dev2015|test2015)")
SPLITS = {"train2014": "train", "val2014": "val", "test-dev2015": "test_dev", "test2015": "test"}
ANSWERED_SPLITS = ("train", "val")

# The official evaluation's normalisation (VQA's vqaEval.py), its tables abridged to the common entries.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
NUMBER_WORDS.update({"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"})
ARTICLES = ("a", "an", "the")
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itll": "it'll", "lets": "let's", "shes": "she's", "shouldnt": "shouldn't", "thats": "that's",
    "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's",
    "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}  # fmt: skip


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = PERIOD_STRIP.sub("", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def soft_score(matches: int, mode: str = "table") -> float:
    """The score of an answer given by ``matches`` of the 10 annotators."""
    if mode == "table":
        return SCORE_TABLE[min(matches, len(SCORE_TABLE) - 1)]
    if mode == "min3":
        return min(1.0, matches / MIN3_MATCHES)
    raise DataError(f"VQA score mode {mode!r} unknown; expected one of {list(SCORE_MODES)}")


def _split_of(path: Path) -> str:
    match = VQA_SPLIT_RE.search(Path(path).name)
    if not match:
        raise DataError(f"{path}: cannot tell the split from the file name (expected ...train2014..., ...val2014... or ...test-dev2015...)")
    return SPLITS[match.group(1)]


def parse_vqa(
    question_files: list[Path], annotation_files: list[Path], min_answer_count: int = DEFAULT_MIN_ANSWER_COUNT, score: str = "table"
) -> tuple[list[dict[str, Any]], list[str], Report]:
    """The ``vqa`` records (image ids ``coco-<id>``, not yet checked against a root), the answer vocabulary, the report."""
    soft_score(0, score)  # refuses an unknown mode before any work
    report = Report()
    annotations: dict[int, Mapping[str, Any]] = {}
    for path in annotation_files:
        data = load_json(path, "VQA annotations file")
        require_keys(data, ("annotations",), str(path))
        for i, ann in enumerate(data["annotations"]):
            require_keys(ann, ("question_id", "answers"), f"{path}: annotations[{i}]")
            annotations[int(ann["question_id"])] = ann
    counts: Counter[str] = Counter()
    normalised: dict[int, list[str]] = {}
    for qid, ann in annotations.items():
        given = [normalize_answer(str(a.get("answer", ""))) for a in ann["answers"] if isinstance(a, Mapping)]
        normalised[qid] = [a for a in given if a]
        counts.update(normalised[qid])
    vocabulary = [a for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_answer_count]
    known = set(vocabulary)
    records: list[dict[str, Any]] = []
    seen: set[int] = set()
    for path in question_files:
        split = _split_of(path)
        data = load_json(path, "VQA questions file")
        require_keys(data, ("questions",), str(path))
        for i, q in enumerate(data["questions"]):
            require_keys(q, ("image_id", "question", "question_id"), f"{path}: questions[{i}]")
            qid = int(q["question_id"])
            report.count_input("vqa")
            if qid in seen:
                report.count_bad("duplicate_id", str(qid), "question id seen before")
                continue
            seen.add(qid)
            answers: list[dict[str, Any]] = []
            answer_type = None
            if split in ANSWERED_SPLITS:
                if not normalised.get(qid):
                    report.count_bad("no_answers", str(qid), "no annotation" if qid not in annotations else "no answers")
                    continue
                answer_type = annotations[qid].get("answer_type")
                matches = Counter(normalised[qid])
                outside = [a for a in matches if a not in known]
                if outside:
                    report.count_fix("answer_outside_vocabulary", len(outside))
                answers = [{"answer": a, "score": soft_score(n, score)} for a, n in sorted(matches.items(), key=lambda kv: (-kv[1], kv[0])) if a in known]
            records.append(
                {
                    "question_id": str(qid),
                    "split": split,
                    "image_id": f"coco-{q['image_id']}",
                    "question": str(q["question"]),
                    "answers": answers,
                    "answer_type": answer_type,
                }
            )
    return records, vocabulary, report
