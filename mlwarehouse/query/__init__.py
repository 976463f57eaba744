"""The query language, the semantics every backend must match: filters, sorts, projections, updates.

- :mod:`.jsonvalues`  field paths, JSON type ranks and comparisons (the value model)
- :mod:`.filters`     parsing and validation of filters and sorts, the pure-Python reference matcher
- :mod:`.documents`   document validation and projections
- :mod:`.updates`     update validation and the reference update applier
- :mod:`.fields`      user-supplied values (numpy scalars, tensors, dates) normalised to JSON at the edge
- :mod:`.records`     a stored document seen with attribute access, and name checks and filters
- :mod:`.text`        filters and sorts typed as text (the CLI's and the web UI's one parser)

The names below are the package's interface; import them from ``mlwarehouse.query``.
"""

from mlwarehouse.query.documents import project, validate_document, validate_projection
from mlwarehouse.query.filters import (
    ElemMatch,
    Field,
    Logical,
    compile_regex,
    distinct_values,
    matches,
    parse_filter,
    sort_docs,
    sort_key,
    top_fields,
    validate_filter,
    validate_sort,
)
from mlwarehouse.query.jsonvalues import (
    ARRAY,
    BOOL,
    MISSING,
    NULL,
    NUMBER,
    OBJECT,
    PATH_RE,
    STRING,
    get_path,
    is_index,
    json_text,
    json_value,
    sort_value,
    split_path,
    type_rank,
    values_equal,
)
from mlwarehouse.query.updates import apply_update, validate_update

__all__ = [
    "MISSING", "PATH_RE", "split_path", "is_index", "get_path", "type_rank", "json_text", "json_value",
    "values_equal", "sort_value",
    "ARRAY", "BOOL", "NULL", "NUMBER", "OBJECT", "STRING",
    "Field", "Logical", "ElemMatch", "parse_filter", "validate_filter", "matches", "validate_sort",
    "sort_key", "sort_docs", "distinct_values", "compile_regex", "top_fields",
    "validate_update", "apply_update", "validate_projection", "project", "validate_document",
]
