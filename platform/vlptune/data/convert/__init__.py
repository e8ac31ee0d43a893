"""Converters from real datasets to the Parquet shards (``vlptune data convert SOURCE``).

* :mod:`.images`: fix one image (sniffed format, EXIF orientation, mode, 16-bit,
  resize, JPEG re-encode) and move its boxes with it: pure functions;
* :mod:`.report`: bad records counted per reason, the conversion report, ``--max-bad-fraction``;
* :mod:`.tasks`: what a source parser hands the pipeline (one :class:`~.tasks.ImageTask`
  per image, downstream records referring to images by id) and the caption checks;
* :mod:`.pipeline`: the Ray Data pipeline (the Ray edge of ``vlptune.data``): chunks,
  resume, shards, manifest, progress;
* :mod:`.captioned` (COCO, Flickr30k, TSV/JSON-lines), :mod:`.web` (img2dataset tar and
  Parquet), :mod:`.vg` (Visual Genome), :mod:`.vqa` (VQA v2), :mod:`.reasoning` (NLVR2,
  SNLI-VE), :mod:`.detections` (detector outputs, VG ground truth): the source parsers;
* :mod:`.extend`: add downstream tables to a converted root whose images they use;
* :mod:`.commands`: the ``vlptune data convert`` sub-commands.

docs/convert.md ("Bring your own data") describes every command and format.
"""
