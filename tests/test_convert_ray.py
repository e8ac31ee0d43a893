"""The conversion on Ray Data: one and two workers (two interrupted and resumed) write the bytes of the in-process map (Ray started once here)."""

from __future__ import annotations

import logging

import pytest

from convert_fixtures import coco_official
from vlptune.data.convert.captioned import parse_coco_official
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import ConversionInterrupted, ConvertOptions, convert
from vlptune.data.shards import verify

SMALL = ImageOptions(max_short_side=96, max_long_side=160)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_one_and_two_ray_data_workers_write_the_bytes_of_the_inline_map(ray_session, tmp_path):
    files, images = coco_official(tmp_path)
    outs = {}

    def options(out, executor, workers, **kw):
        return ConvertOptions(out=out, images=SMALL, shard_size=3, executor=executor, workers=workers, max_bad_fraction=0.5, **kw)

    for name, executor, workers in (("inline", "inline", 1), ("ray1", "ray", 1)):
        convert(parse_coco_official(files, images), options(tmp_path / name, executor, workers))
    # two workers, stopped as if killed after 2 shards, then resumed: the same bytes as one uninterrupted worker
    with pytest.raises(ConversionInterrupted):
        convert(parse_coco_official(files, images), options(tmp_path / "ray2", "ray", 2, stop_after_shards=2))
    assert convert(parse_coco_official(files, images), options(tmp_path / "ray2", "ray", 2, resume=True))["resumed_shards"] == 2
    for name in ("inline", "ray1", "ray2"):
        assert verify(tmp_path / name) == []
        outs[name] = _bytes(tmp_path / name)
    assert len(outs["inline"]) == 6  # 4 image_text shards (12 images, 3 a shard) + 2 retrieval
    assert outs["ray1"] == outs["inline"]
    assert outs["ray2"] == outs["inline"]
    assert ray_session.is_initialized()  # the pipeline used the running Ray and left it running
