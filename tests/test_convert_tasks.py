"""VQA v2, SNLI-VE (into converted roots) and NLVR2 (own images): exact counts, scores, vocabulary, verify (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert_fixtures import ALL_FILES, awkward_images, coco_official, jpeg_bytes, png_bytes
from vlptune.cli import main
from vlptune.data.convert.captioned import parse_coco_official, parse_karpathy
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import ConvertOptions, convert
from vlptune.data.convert.reasoning import parse_nlvr2
from vlptune.data.convert.vqa import normalize_answer, soft_score
from vlptune.data.shards import iter_records, read_manifest, verify

SMALL = ImageOptions(max_short_side=96, max_long_side=160)


def _options(out: Path) -> ConvertOptions:
    return ConvertOptions(out=out, images=SMALL, shard_size=4, executor="inline", max_bad_fraction=0.6, phrases=False)


def _coco_id(name: str) -> int:
    return 100 + ALL_FILES.index(name)


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_answer_normalisation_and_soft_scores_follow_the_official_evaluation():
    assert [normalize_answer(a) for a in ("Two", "2 ", "a dog", "Yes!", "dont know", "1,000", "the cat.")] == [
        "2",
        "2",
        "dog",
        "yes",
        "don't know",
        "1000",
        "cat",
    ]
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert [round(soft_score(n, "min3"), 3) for n in (1, 2, 3, 4)] == [0.333, 0.667, 1.0, 1.0]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("cocoroot")
    files, images = coco_official(base)
    convert(parse_coco_official(files, images), _options(base / "coco"))
    return base


def test_vqa_into_a_coco_root(coco_root, capsys):
    root = coco_root / "coco"
    plain0, plain1, truncated = _coco_id("plain_0.jpg"), _coco_id("plain_1.jpg"), _coco_id("truncated.jpg")
    q = lambda qid, image, text="what is it?": {"question_id": qid, "image_id": image, "question": text}
    train_q = _write(coco_root / "v2_OpenEnded_mscoco_train2014_questions.json", {"questions": [q(1, plain0), q(3, plain0), q(5, truncated), q(7, 999)]})
    val_q = _write(coco_root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [q(2, plain1), q(2, plain1)]})
    dev_q = _write(coco_root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": [q(6, plain0, "how many?")]})
    answers = lambda *pairs: [{"answer": a, "answer_id": i} for a, n in pairs for i in range(n)]
    anns = [
        {"question_id": 1, "answers": answers(("Two", 3), ("2 ", 1), ("three", 2), ("a dog", 1), ("dogs", 3)), "answer_type": "number"},
        {"question_id": 2, "answers": answers(("yes", 10)), "answer_type": "yes/no"},
        {"question_id": 5, "answers": answers(("no", 10)), "answer_type": "yes/no"},
        {"question_id": 7, "answers": answers(("no", 10)), "answer_type": "yes/no"},
    ]
    train_a = _write(coco_root / "v2_mscoco_train2014_annotations.json", {"annotations": anns[:1] + anns[2:]})
    val_a = _write(coco_root / "v2_mscoco_val2014_annotations.json", {"annotations": anns[1:2]})
    args = ["data", "convert", "vqa", "--questions", str(train_q), str(val_q), str(dev_q), "--annotations", str(train_a), str(val_a)]
    assert main(args + ["--into", str(root), "--min-answer-count", "2", "--max-bad-fraction", "0.7"]) == 0
    assert "vqa 3" in capsys.readouterr().out
    assert verify(root) == []
    manifest = read_manifest(root)
    assert manifest["counts"]["vqa"] == {"test_dev": 1, "train": 1, "val": 1}
    assert manifest["vocabularies"]["vqa_answers"] == ["no", "yes", "2", "dogs", "3"]  # given >= 2 times, most frequent first
    records = {r["question_id"]: r for r in iter_records(root, "vqa")}
    assert records["1"]["answers"] == [
        {"answer": "2", "score": 1.0},
        {"answer": "dogs", "score": pytest.approx(0.9)},
        {"answer": "3", "score": pytest.approx(0.6)},
    ]
    assert records["1"]["answer_type"] == "number" and records["1"]["image_id"] == f"coco-{plain0}"
    assert records["6"]["answers"] == [] and records["6"]["split"] == "test_dev"  # test-dev: no answers
    report = json.loads((root / "conversion_report_vqa.json").read_text())
    # q3 has no annotation; q2 twice; q5's image was dropped at conversion (truncated) and 999 never existed
    assert {r: v["count"] for r, v in report["bad"].items()} == {"no_answers": 1, "duplicate_id": 1, "unknown_image": 2}
    assert report["inputs"] == {"vqa": 7} and report["fixes"] == {"answer_outside_vocabulary": 1}  # "dog"
    assert main(args + ["--into", str(root), "--min-answer-count", "2", "--max-bad-fraction", "0.7"]) == 2  # already there
    assert "already holds table(s) ['vqa']; pass --overwrite" in capsys.readouterr().err


def test_snli_ve_into_a_flickr30k_root(tmp_path, capsys):
    awkward_images(tmp_path / "imgs")
    images = [{"filename": n, "split": s, "sentences": [{"raw": f"a caption of {n}"}]} for n, s in (("plain_0.jpg", "train"), ("plain_1.jpg", "test"))]
    karpathy = _write(tmp_path / "dataset_flickr30k.json", {"images": images})
    root = tmp_path / "f30k"
    convert(parse_karpathy(karpathy, tmp_path / "imgs", "flickr30k"), _options(root))
    rows = [
        {"pairID": "p1", "Flickr30K_ID": "plain_0", "sentence2": "Something  is shown.", "gold_label": "entailment"},
        {"pairID": "p2", "Flikr30kID": "plain_0.jpg", "sentence2": "Nothing is shown.", "gold_label": "contradiction"},  # the older key
        {"pairID": "p3", "Flickr30K_ID": "plain_0", "sentence2": "Maybe.", "gold_label": "-"},
        {"pairID": "p4", "Flickr30K_ID": "nobody", "sentence2": "Who?", "gold_label": "neutral"},
        {"pairID": "p1", "Flickr30K_ID": "plain_0", "sentence2": "Again.", "gold_label": "neutral"},
        {"pairID": "p5", "Flickr30K_ID": "plain_0", "sentence2": " ", "gold_label": "neutral"},
    ]
    train = _write(tmp_path / "snli_ve_train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    test = _write(
        tmp_path / "snli_ve_test.jsonl", json.dumps({"pairID": "t1", "Flickr30K_ID": "plain_1", "sentence2": "A test.", "gold_label": "neutral"}) + "\n"
    )
    assert main(["data", "convert", "snli-ve", "--jsonl", str(train), str(test), "--into", str(root), "--max-bad-fraction", "0.8"]) == 0
    capsys.readouterr()
    assert verify(root) == []
    records = {r["id"]: r for r in iter_records(root, "ve")}
    assert sorted(records) == ["p1", "p2", "t1"]
    assert records["p1"]["hypothesis"] == "Something is shown." and records["p1"]["label"] == 0 and records["p2"]["label"] == 2
    assert records["t1"]["image_id"] == "flickr30k-plain_1" and records["t1"]["split"] == "test"
    report = json.loads((root / "conversion_report_snli-ve.json").read_text())
    assert {r: v["count"] for r, v in report["bad"].items()} == {
        "no_gold_label": 1,
        "unknown_image": 1,
        "duplicate_id": 1,
        "empty_caption": 1,
        "bad_row": 1,
    }
    assert report["inputs"] == {"ve": 8}
    # the images are the root's: stored once, no copy
    assert read_manifest(root)["counts"]["image_text"] == {"test": 1, "train": 1}


def test_nlvr2_pairs_store_each_image_once_and_sniff_the_bytes(tmp_path):
    from convert_fixtures import _noise

    images = tmp_path / "images"
    (images / "train" / "0").mkdir(parents=True)
    (images / "dev").mkdir()
    (images / "train" / "0" / "train-10-0-img0.png").write_bytes(png_bytes(_noise(64, 48, 1)))
    (images / "train" / "0" / "train-10-0-img1.png").write_bytes(jpeg_bytes(_noise(64, 48, 2)))  # JPEG bytes behind .png
    (images / "dev" / "dev-5-1-img0.png").write_bytes(png_bytes(_noise(48, 64, 3)))
    (images / "dev" / "dev-5-1-img1.png").write_bytes(b"")
    rows = [
        {"identifier": "train-10-0-0", "sentence": "The left image has more dogs.", "label": "True", "directory": 0},
        {"identifier": "train-10-0-1", "sentence": "Both images show a cat.", "label": "False", "directory": 0},
        {"identifier": "train-10-0-1", "sentence": "Again.", "label": "False", "directory": 0},
        {"identifier": "train-10-0-2", "sentence": "", "label": "True", "directory": 0},
        {"identifier": "dev-5-1-0", "sentence": "One image is empty.", "label": "True"},
        {"identifier": "dev-5-1-1", "sentence": "Unsure.", "label": "maybe"},
    ]
    train = _write(tmp_path / "train.json", "\n".join(json.dumps(r) for r in rows[:4]) + "\n[1, 2]\n")
    dev = _write(tmp_path / "dev.json", "\n".join(json.dumps(r) for r in rows[4:]) + "\n")
    out = tmp_path / "nlvr2"
    summary = convert(parse_nlvr2([train, dev], images), _options(out))
    assert verify(out) == []
    assert summary["counts"] == {"image_text": {"train": 2, "val": 1}, "nlvr2": {"train": 2}}
    report = summary["report"]
    assert report.bad == {"duplicate_id": 1, "empty_caption": 1, "bad_row": 1, "bad_label": 1, "zero_byte_image": 1, "image_unusable": 1}
    assert report.inputs == {"images": 4, "nlvr2": 7}
    assert report.fixes["extension_mismatch"] == 1 and report.fixes["reencoded_from_other_format"] == 2
    records = {r["id"]: r for r in iter_records(out, "nlvr2")}
    assert records["train-10-0-1"]["label"] is False and records["train-10-0-0"]["image_id_right"] == "nlvr2-train-10-0-img1"
    stored = {r["image_id"]: r for r in iter_records(out, "image_text")}
    assert sorted(stored) == ["nlvr2-dev-5-1-img0", "nlvr2-train-10-0-img0", "nlvr2-train-10-0-img1"] and stored["nlvr2-dev-5-1-img0"]["captions"] == []


def test_coco_test2015_images_serve_vqa_test_dev(tmp_path, capsys):
    from convert_fixtures import _noise

    files, images = coco_official(tmp_path)
    test_dir = tmp_path / "test2015"
    test_dir.mkdir()
    (test_dir / "COCO_test2015_000000000777.jpg").write_bytes(jpeg_bytes(_noise(64, 48, 9)))
    (test_dir / "notes.txt").write_text("not an image")
    root = tmp_path / "coco"
    args = ["data", "convert", "coco", "--annotations", *map(str, files), "--images", str(images), "--test-images", str(test_dir), "--out", str(root)]
    assert main(args + ["--executor", "inline", "--no-phrases", "--max-bad-fraction", "0.5", "--quiet"]) == 0
    stored = {r["image_id"]: r for r in iter_records(root, "image_text", "test2015")}
    assert list(stored) == ["coco-777"] and stored["coco-777"]["captions"] == []
    assert "retrieval" not in read_manifest(root)["counts"] or "test2015" not in read_manifest(root)["counts"]["retrieval"]
    dev = _write(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": [{"question_id": 9, "image_id": 777, "question": "what?"}]})
    assert main(["data", "convert", "vqa", "--questions", str(dev), "--into", str(root)]) == 0
    assert [(r["question_id"], r["image_id"], r["answers"]) for r in iter_records(root, "vqa")] == [("9", "coco-777", [])]
    capsys.readouterr()
