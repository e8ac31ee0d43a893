"""Arrow schemas of the Parquet shards, and their validation.

One schema per table. Every shard of a table carries that table's schema;
reading a shard checks its schema against the one here and refuses it with a
`DataError` that names the file, the field, what was expected and what was
found. The table and field names are the contract between the writers (the
synthetic world, the converters from real data) and the readers (the
dataset, the tasks); docs/data.md describes every field.

Comparison rules (`validate_schema`):
  * every field of the expected schema must be present, with the same type;
  * extra columns are allowed and ignored by the readers;
  * nullability is not compared: a reader must accept nulls where the
    schema allows them, and a column declared nullable that happens to hold
    none is harmless;
  * the names of list items ("item" from Arrow, "element" from other Parquet
    writers) are not compared, struct field names and order are;
  * a column listed in `OPTIONAL_COLUMNS` may be missing altogether (shards
    written before it existed, converters that do not produce it): readers
    see it as all nulls (`complete_optional_columns`).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2
# Versions this code reads: version 1 shards lack only the optional columns version 2 added
# (image_text.caption_boxes, vqa.answer_type), which read as nulls.
READABLE_SCHEMA_VERSIONS = (1, 2)

ROI_FEATURE_DIM_DEFAULT = 32
BOX_LEN = 4  # [x0, y0, x1, y1] in pixels

TABLE_IMAGE_TEXT = "image_text"
TABLE_VQA = "vqa"
TABLE_NLVR2 = "nlvr2"
TABLE_VE = "ve"
TABLE_RETRIEVAL = "retrieval"

VE_LABELS = ("entailment", "neutral", "contradiction")  # label = index

# The per-table column that identifies a record in error messages.
RECORD_ID_FIELD = {
    TABLE_IMAGE_TEXT: "image_id",
    TABLE_VQA: "question_id",
    TABLE_NLVR2: "id",
    TABLE_VE: "id",
    TABLE_RETRIEVAL: "image_id",
}


class DataError(ValueError):
    """Bad input data: the message names the file, record and/or field."""


PHRASE_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("start", pa.int32(), nullable=False),  # char span [start, end)
        pa.field("end", pa.int32(), nullable=False),
        pa.field("tok_start", pa.int32(), nullable=False),  # spaCy token span
        pa.field("tok_end", pa.int32(), nullable=False),
    ]
)

OBJECT_TYPE = pa.struct(
    [
        pa.field("box", pa.list_(pa.float32(), BOX_LEN), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("attributes", pa.list_(pa.int32()), nullable=False),
        pa.field("roi_feature", pa.list_(pa.float32()), nullable=True),
    ]
)

IMAGE_TEXT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG (or JPEG) bytes
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("phrases", pa.list_(pa.list_(PHRASE_TYPE)), nullable=False),
        pa.field("objects", pa.list_(OBJECT_TYPE), nullable=False),
        pa.field("segmentation", pa.binary(), nullable=True),  # PNG of a uint8 map
        # KD-VLP phrase-label similarity alpha(z, n): per caption, per phrase, per object
        # (vlptune.data.similarity); optional: absent from older shards
        pa.field("phrase_label_sim", pa.list_(pa.list_(pa.list_(pa.float32()))), nullable=True),
        # per caption, the box of the region it describes (Visual Genome region descriptions), null
        # for a caption of the whole image; optional (schema version 2)
        pa.field("caption_boxes", pa.list_(pa.list_(pa.float32(), BOX_LEN)), nullable=True),
    ]
)

# Columns a shard may lack entirely (read as nulls); each must be nullable in its schema.
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    TABLE_IMAGE_TEXT: ("phrase_label_sim", "caption_boxes"),
    "vqa": ("answer_type",),
}

VQA_ANSWER_TYPE = pa.struct(
    [
        pa.field("answer", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)

VQA_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answers", pa.list_(VQA_ANSWER_TYPE), nullable=False),
        # VQA v2's answer_type ("yes/no", "number", "other"); optional (schema version 2)
        pa.field("answer_type", pa.string(), nullable=True),
    ]
)

NLVR2_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_id_left", pa.string(), nullable=False),
        pa.field("image_id_right", pa.string(), nullable=False),
        pa.field("statement", pa.string(), nullable=False),
        pa.field("label", pa.bool_(), nullable=False),
    ]
)

VE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("hypothesis", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
    ]
)

RETRIEVAL_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    TABLE_IMAGE_TEXT: IMAGE_TEXT_SCHEMA,
    TABLE_VQA: VQA_SCHEMA,
    TABLE_NLVR2: NLVR2_SCHEMA,
    TABLE_VE: VE_SCHEMA,
    TABLE_RETRIEVAL: RETRIEVAL_SCHEMA,
}

TABLES: tuple[str, ...] = tuple(SCHEMAS)


def schema_for(table_name: str) -> pa.Schema:
    """The schema of `table_name`; DataError naming the known tables if unknown."""
    try:
        return SCHEMAS[table_name]
    except KeyError:
        raise DataError(
            f"unknown table {table_name!r}; known tables: {', '.join(TABLES)}"
        ) from None


def _type_mismatch(path: str, expected: pa.DataType, found: pa.DataType) -> str | None:
    """Where `found` differs from `expected`, as 'field.path: expected X, found Y'.

    None when they match. Recurses into lists and structs so the message
    names the innermost field that differs.
    """
    if pa.types.is_fixed_size_list(expected):
        if not pa.types.is_fixed_size_list(found) or found.list_size != expected.list_size:
            return f"{path}: expected {expected}, found {found}"
        return _type_mismatch(f"{path}[]", expected.value_type, found.value_type)
    if pa.types.is_list(expected):
        if not pa.types.is_list(found):
            return f"{path}: expected {expected}, found {found}"
        return _type_mismatch(f"{path}[]", expected.value_type, found.value_type)
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(found):
            return f"{path}: expected {expected}, found {found}"
        found_names = [found.field(i).name for i in range(found.num_fields)]
        for i in range(expected.num_fields):
            sub = expected.field(i)
            if sub.name not in found_names:
                return (
                    f"{path}.{sub.name}: missing struct field (expected {sub.type}); "
                    f"found fields {found_names}"
                )
            problem = _type_mismatch(
                f"{path}.{sub.name}", sub.type, found.field(found_names.index(sub.name)).type
            )
            if problem:
                return problem
        return None
    if not found.equals(expected):
        return f"{path}: expected {expected}, found {found}"
    return None


def schema_problems(table_name: str, arrow_schema: pa.Schema) -> list[str]:
    """Every difference between `arrow_schema` and the schema of `table_name`."""
    expected = schema_for(table_name)
    optional = OPTIONAL_COLUMNS.get(table_name, ())
    problems = []
    for field in expected:
        idx = arrow_schema.get_field_index(field.name)
        if idx < 0 and field.name in optional:
            continue
        if idx < 0:
            problems.append(f"{field.name}: missing column (expected {field.type})")
            continue
        problem = _type_mismatch(field.name, field.type, arrow_schema.field(idx).type)
        if problem:
            problems.append(problem)
    return problems


def present_columns(table_name: str, arrow_schema: pa.Schema) -> list[str]:
    """The columns of `table_name`'s schema that `arrow_schema` holds (optional ones may be absent)."""
    return [f.name for f in schema_for(table_name) if arrow_schema.get_field_index(f.name) >= 0]


def complete_optional_columns(table_name: str, table: pa.Table) -> pa.Table:
    """`table` with every missing optional column added as nulls, columns in schema order."""
    expected = schema_for(table_name)
    columns = []
    for field in expected:
        if table.schema.get_field_index(field.name) >= 0:
            columns.append(table.column(field.name))
        elif field.name in OPTIONAL_COLUMNS.get(table_name, ()):
            columns.append(pa.nulls(table.num_rows, type=field.type))
        else:
            raise DataError(f"table {table_name!r}: column {field.name!r} is missing and not optional")
    return pa.Table.from_arrays(columns, schema=pa.schema([pa.field(f.name, f.type, f.nullable) for f in expected]))


def validate_schema(table_name: str, arrow_schema: pa.Schema, path) -> None:
    """Raise DataError naming `path` and every mismatching field, if any."""
    problems = schema_problems(table_name, arrow_schema)
    if problems:
        raise DataError(
            f"{path}: schema does not match table {table_name!r} "
            f"(schema version {SCHEMA_VERSION}): " + "; ".join(problems)
        )
