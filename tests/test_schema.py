"""fedseg.schema: one message style for every configuration mistake, TOML in and out, records that keep their shape."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import Field

from fedseg.errors import DataError, FedsegError
from fedseg.io import read_json
from fedseg.schema import Integer, Number, Record, Table, must_be, read_toml, toml_text, write_toml


class Inner(Table):
    toml_table = "outer.inner"

    ratio: Annotated[Number, Field(gt=0, le=1)] = 0.5


class Outer(Table):
    toml_table = "outer"
    error = DataError

    count: Annotated[Integer, Field(ge=1)] = 1
    size: tuple[Integer, Integer] = (2, 2)
    mode: Annotated[str, must_be("fast or slow")] = "fast"
    inner: Inner = Inner()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cuont": 2}, "f.toml: unknown option(s) in the outer table ['cuont']; [outer] takes count, size, mode, inner"),
        ({"count": "2"}, "f.toml: outer.count must be an integer >= 1, got '2'"),
        ({"count": 2.0}, "f.toml: outer.count must be an integer >= 1, got 2.0"),
        ({"count": True}, "f.toml: outer.count must be an integer >= 1, got True"),
        ({"count": 0}, "f.toml: outer.count must be an integer >= 1, got 0"),
        ({"size": [1]}, "f.toml: outer.size must be a list of 2 integers, got [1]"),
        ({"size": [1, "x"]}, "f.toml: outer.size must be a list of 2 integers (item 1 is 'x')"),
        ({"mode": 3}, "f.toml: outer.mode must be fast or slow, got 3"),
        ({"inner": {"ratio": 0}}, "f.toml: outer.inner.ratio must be a number > 0 and <= 1, got 0"),
        ({"inner": {"ratio": float("nan")}}, "f.toml: outer.inner.ratio must be a number > 0 and <= 1, got nan"),
        ({"inner": {"rate": 1}}, "f.toml: unknown option(s) in the outer.inner table ['rate']; [outer.inner] takes ratio"),
        ({"inner": 3}, "f.toml: outer.inner must be a table, got 3"),
    ],
)
def test_every_mistake_names_the_file_the_key_and_what_is_allowed(data, message):
    with pytest.raises(DataError) as info:
        Outer.from_dict(data, source="f.toml")
    assert str(info.value) == message


def test_all_mistakes_are_reported_at_once_and_construction_raises_the_tables_error():
    with pytest.raises(DataError) as info:
        Outer.from_dict({"count": 0, "inner": {"ratio": 2}, "z": 1, "a": 2}, source="f.toml")
    assert str(info.value) == (
        "f.toml: unknown option(s) in the outer table ['a', 'z']; [outer] takes count, size, mode, inner; "
        "outer.count must be an integer >= 1, got 0; outer.inner.ratio must be a number > 0 and <= 1, got 2"
    )
    with pytest.raises(DataError, match=r"^outer.count must be an integer >= 1, got -1$"):
        Outer(count=-1)


def test_integers_stay_integers_and_replace_validates_again():
    table = Outer(inner=Inner(ratio=1))
    assert table.to_dict() == {"count": 1, "size": [2, 2], "mode": "fast", "inner": {"ratio": 1}}
    assert type(table.inner.ratio) is int  # "1" and "1.0" hash differently in cache keys
    assert table.replace(count=3).count == 3 and table.count == 1
    with pytest.raises(DataError, match="outer.count"):
        table.replace(count=0)
    with pytest.raises(ValueError, match="frozen"):
        table.count = 2  # type: ignore[misc]


def test_toml_round_trip_leaves_out_unset_values(tmp_path):
    path = tmp_path / "x.toml"
    write_toml(path, {"a": {"n": 1, "unset": None, "empty": {}, "list": [1, 2]}, "b": {"c": {"x": 0.5}}})
    assert read_toml(path) == {"a": {"n": 1, "list": [1, 2]}, "b": {"c": {"x": 0.5}}}
    assert not (tmp_path / "x.toml.partial").exists()
    assert "unset" not in toml_text({"a": {"unset": None}})


def test_unreadable_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\n")
    with pytest.raises(FedsegError, match="bad.toml: cannot read TOML"):
        read_toml(path)


class Entry(Record):
    optional_keys = ("flag",)

    n: int
    flag: bool = False
    note: str | None = None


class Log(Record):
    entries: list[Entry] = []


def test_records_keep_their_shape_and_unknown_keys(tmp_path):
    path = tmp_path / "log.json"
    Log(entries=[Entry(n=1), Entry(n=2, flag=True)]).write(path)
    assert read_json(path) == {"entries": [{"n": 1, "note": None}, {"n": 2, "flag": True, "note": None}]}
    newer = {"entries": [{"n": 3, "added_later": "x"}], "also_later": 1}
    path.write_text(__import__("json").dumps(newer))
    record = Log.read(path)
    assert record.entries[0].flag is False  # a field the file predates: its default
    record.write(path)
    assert read_json(path) == {"entries": [{"n": 3, "note": None, "added_later": "x"}], "also_later": 1}


def test_a_malformed_record_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "log.json"
    path.write_text('{"entries": [{"n": "three"}]}')
    with pytest.raises(FedsegError) as info:
        Log.read(path)
    assert str(info.value).startswith(f"{path}: entries[0].n must be an integer")
