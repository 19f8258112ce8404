from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gristmill.client.errors import InvalidArgument
from gristmill.client.names import refused_character, validate_dataset_name, validate_path
from gristmill.common.paging import decode_page_token, encode_page_token, page_size

BAD_PATHS = ["", "../x", "/etc/passwd", "a/../../x", "a\\..\\x", "%2e%2e/x", "a/%2E%2E/b",
             "a/%2fetc", "./a", "a/./b", "a//b", "a/", "a\x00b", "a\nb", "x" * 1025,
             "a/" + "y" * 256, "..", "a\u202eb", "x\u200b", "\ufeffa", "a\x85", "a\x9fb",
             "a\u2066b", "a\u061c", "a\u00adb", "a\u2028b", "a/\ud800"]
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
        result = validate_path(path)
    except InvalidArgument:
        return
    import posixpath
    assert result == unicodedata.normalize("NFC", path)
    assert validate_path(result) == result
    assert not posixpath.isabs(result)
    assert posixpath.normpath(result) == result
    assert ".." not in result.split("/") and "\\" not in result and "\x00" not in result
    assert refused_character(result) is None
    assert all(unicodedata.category(c) not in ("Cc", "Cf") for c in result)


def test_paths_are_returned_in_nfc() -> None:
    nfd = unicodedata.normalize("NFD", "ünï/cödé.png")
    assert nfd != "ünï/cödé.png"
    assert validate_path(nfd) == "ünï/cödé.png"
    # the 255-byte limit counts the NFC form: 127 decomposed é are 381 bytes, composed 254
    assert validate_path(unicodedata.normalize("NFD", "é" * 127)) == "é" * 127


@pytest.mark.parametrize(("text", "code"), [("a\u202eb", "U+202E RIGHT-TO-LEFT OVERRIDE"),
                                            ("x\u200d", "U+200D ZERO WIDTH JOINER"),
                                            ("\x85", "U+0085"), ("ok\u2069", "U+2069")])
def test_refused_characters_are_named(text: str, code: str) -> None:
    for check in (validate_path, validate_dataset_name):
        with pytest.raises(InvalidArgument) as info:
            check(text)
        assert code in info.value.message
    assert refused_character("café/ü.png") is None


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
