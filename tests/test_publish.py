"""curation.publish pieces on their own (the whole writer runs in tests/test_curate*.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from curation.publish import RowGroups


def test_row_groups_have_a_fixed_size_whatever_the_units_hold(tmp_path):
    """finalize feeds the manifests a unit at a time; the file's row groups are `rows` long (the
    last one shorter), in the order the rows came, and no unit boundary shows."""
    path = tmp_path / "m.parquet"
    schema = pa.schema([("n", pa.int64())])
    writer = RowGroups(pq.ParquetWriter(path, schema), rows=10)
    sizes = [3, 0, 9, 4, 1, 17, 2]  # 36 rows in 7 units
    start = 0
    for size in sizes:
        writer.add(pa.table({"n": list(range(start, start + size))}, schema=schema))
        start += size
        assert writer.count < 10  # never more than one group held
    writer.close()
    f = pq.ParquetFile(path)
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [10, 10, 10, 6]
    assert f.read().column("n").to_pylist() == list(range(36))
