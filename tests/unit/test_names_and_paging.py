from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gristmill.client.errors import InvalidArgument
from gristmill.client.names import validate_dataset_name, validate_path
from gristmill.common.paging import decode_page_token, encode_page_token, page_size

BAD_PATHS = ["", "../x", "/etc/passwd", "a/../../x", "a\\..\\x", "%2e%2e/x", "a/%2E%2E/b",
             "a/%2fetc", "./a", "a/./b", "a//b", "a/", "a\x00b", "a\nb", "x" * 1025,
             "a/" + "y" * 256, ".."]
GOOD_PATHS = ["a.jpg", "train/cats/001.jpg", "ünï/cödé.png", "a..b/c", "...x", "100%/a.png",
              "image%20001.jpg", ".hidden/file"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_refused(path: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_path(path, "chunks.path")
    assert info.value.field == "chunks.path"
    assert "relative path" in info.value.message


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_good_paths_accepted(path: str) -> None:
    assert validate_path(path) == path


@given(st.text(min_size=1, max_size=60))
def test_accepted_paths_never_escape(path: str) -> None:
    try:
        validate_path(path)
    except InvalidArgument:
        return
    import posixpath
    assert not posixpath.isabs(path)
    assert posixpath.normpath(path) == path
    assert ".." not in path.split("/") and "\\" not in path and "\x00" not in path


@pytest.mark.parametrize("name", ["a", "imagenet-1k", "Data_set.v2", "9" * 128])
def test_good_names(name: str) -> None:
    assert validate_dataset_name(name) == name


def test_page_size_rules() -> None:
    assert page_size(0, 100, 1000) == 100
    assert page_size(5000, 100, 1000) == 1000
    assert page_size(7, 100, 1000) == 7
    with pytest.raises(InvalidArgument, match="page_size"):
        page_size(-1, 100, 1000)


def test_page_tokens_bound_to_query() -> None:
    token = encode_page_token(["manifest", "a", "latest", ""], "x/y.jpg")
    assert decode_page_token(token, ["manifest", "a", "latest", ""]) == "x/y.jpg"
    assert decode_page_token("", ["q"]) is None
    with pytest.raises(InvalidArgument, match="different query"):
        decode_page_token(token, ["manifest", "b", "latest", ""])
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_page_token("%%%", ["q"])
