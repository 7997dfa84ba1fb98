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


# --- column resolution (schemas.catalog.resolve_columns) ---------------------------------------------

from schemas.catalog import CatalogColumnError, closest_column, resolve_columns  # noqa: E402

SAMPLE_COLUMNS = ("item_id", "title", "description", "image_uri", "audio_uri", "price")


def test_default_column_missing_is_reported_with_the_closest_match():
    missing = resolve_columns({"a.parquet": SAMPLE_COLUMNS}, CatalogColumns())
    assert [m.field for m in missing] == ["image_uris"]
    m = missing[0]
    assert (m.suggestion, m.modality, m.files_missing, m.files) == ("image_uri", "image", 1, 1)
    assert m.message() == "no column 'image_uris'; did you mean --image_column image_uri? (image not read)"
    assert m.to_json()["message"] == m.message()


def test_all_columns_present_reports_nothing():
    cols = ("item_id", "title", "description", "image_uris", "audio_uri")
    assert resolve_columns({"a": cols, "b": cols}, CatalogColumns()) == ()


def test_explicit_column_missing_is_an_error_naming_the_columns_and_the_closest():
    with pytest.raises(CatalogColumnError) as e:
        resolve_columns({"a.parquet": SAMPLE_COLUMNS}, CatalogColumns(image_uris="image_url"), frozenset({"image_uris"}))
    assert "--image_column 'image_url'" in str(e.value) and "did you mean --image_column image_uri?" in str(e.value)
    assert "catalog columns: audio_uri, description, image_uri, item_id, price, title" in str(e.value)


def test_item_id_and_passthrough_columns_must_exist():
    with pytest.raises(CatalogColumnError, match="--item_id_column 'item_id'.*did you mean --item_id_column sku_id"):
        resolve_columns({"a": ("sku_id", "title")}, CatalogColumns())
    with pytest.raises(CatalogColumnError, match="--passthrough_columns 'colour'.*did you mean --passthrough_columns color"):
        resolve_columns({"a": ("item_id", "title", "color")}, CatalogColumns(passthrough=("colour",)),
                        frozenset({"passthrough"}))


def test_no_content_column_is_an_error():
    with pytest.raises(CatalogColumnError, match="none of the content columns"):
        resolve_columns({"a": ("item_id", "price")}, CatalogColumns())


def test_a_column_missing_in_some_files_says_how_many():
    full = ("item_id", "title", "description", "image_uris", "audio_uri")
    missing = resolve_columns({"a": full, "b": full[:-1], "c": full[:-1]}, CatalogColumns())
    assert missing[0].message().startswith("no column 'audio_uri' in 2 of 3 files")
    with pytest.raises(CatalogColumnError, match="2 catalog files"):  # an explicit one must be in every file
        resolve_columns({"a": full, "b": full[:-1], "c": full[:-1]}, CatalogColumns(), frozenset({"audio_uri"}))


def test_closest_column_uses_case_plural_and_field_keywords():
    assert closest_column("image_uris", ["Image_URIs"]) == "Image_URIs"
    assert closest_column("image_uris", ["photo_url", "price"], "image_uris") == "photo_url"
    assert closest_column("image_uris", ["price", "sku"], "image_uris") is None
