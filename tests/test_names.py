"""Names end where they appear to: a trailing newline is not part of a valid
dataset, node, collection or document name (``$`` would have allowed it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Node
from engine.errors import SchemaError, UpdateError, UserError
from engine.ids import is_id
from engine.schema import parse_schema


@pytest.mark.parametrize(("dataset", "node"), [("acme\n", "HN"), ("acme", "HN\n")])
def test_node_names_with_a_trailing_newline_are_refused(
    tmp_path: Path, dataset: str, node: str
) -> None:
    with pytest.raises(UserError):
        Node.create(tmp_path / "h", dataset=dataset, node=node)
    assert not (tmp_path / "h" / "branchline.db").exists()


def test_collection_names_and_ids_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError):
        parse_schema('[collections."things\\n"]\nfields.code = "text"\n')
    assert not is_id("01KDVDNA00303KBFWS5Q4YKHGP\n")
    node = Node.create(tmp_path / "h", dataset="acme", node="HN")
    with pytest.raises(UpdateError):
        node.import_updates({"customers\n": b"\x00\x00"})
