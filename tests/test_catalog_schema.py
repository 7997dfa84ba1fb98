import pytest

from schemas.catalog import CatalogColumns, InvalidRow, validate_row


def test_valid_row_with_every_field():
    item = validate_row(
        {"item_id": " sku-1 ", "title": "Red mug", "description": "  Ceramic. ", "image_uris": ["a.jpg", " ", None],
         "audio_uri": "a.wav"},
        base_uri="/cat", source="/cat/c.parquet#3")
    assert item.item_id == "sku-1"
    assert item.text == "Red mug. Ceramic."
    assert item.image_uris == ("a.jpg",)
    assert item.audio_uri == "a.wav"
    assert (item.base_uri, item.source) == ("/cat", "/cat/c.parquet#3")


def test_nulls_and_empty_text_are_missing():
    item = validate_row({"item_id": "x", "title": "", "description": None, "image_uris": None})
    assert item.text is None and item.image_uris == () and not item.has_content


def test_single_string_uri_and_integer_id():
    item = validate_row({"item_id": 42, "image_uris": "img.png"})
    assert item.item_id == "42" and item.image_uris == ("img.png",)


@pytest.mark.parametrize("row, column, expected", [
    ({"item_id": None}, "item_id", "non-empty string"),
    ({"item_id": "  "}, "item_id", "non-empty string"),
    ({"item_id": "a", "title": 5}, "title", "string or null"),
    ({"item_id": "a", "image_uris": 3.5}, "image_uris", "URI string"),
    ({"item_id": "a", "image_uris": ["ok.jpg", 7]}, "image_uris", "list of URI strings"),
    ({"item_id": "a", "audio_uri": ["x"]}, "audio_uri", "URI string or null"),
])
def test_invalid_rows_name_item_column_and_expectation(row, column, expected):
    with pytest.raises(InvalidRow) as err:
        validate_row(row)
    assert err.value.column == column
    assert expected in str(err.value)
    if row.get("item_id") not in (None, "  "):
        assert repr(row["item_id"]) in str(err.value)


def test_mapped_columns_and_passthrough():
    cols = CatalogColumns(item_id="sku", title="name", description="desc", image_uris="img", audio_uri="voice",
                          passthrough=("price",))
    item = validate_row({"sku": "s", "name": "N", "desc": None, "img": None, "voice": None, "price": 9.5}, cols)
    assert item.item_id == "s" and item.text == "N" and item.attributes == '{"price": 9.5}'


def test_long_text_is_truncated():
    item = validate_row({"item_id": "a", "title": "x" * 50}, max_text_chars=10)
    assert item.title == "x" * 10


def test_column_names_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        CatalogColumns(title="t", description="t")
