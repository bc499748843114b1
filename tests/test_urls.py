"""updater.urls: every malformed URL is the caller's typed error, never ValueError."""

from __future__ import annotations

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import parse_or_typed_error
from updater.errors import ConfigError
from updater.urls import Url, parse_url


def config_error(why: str) -> ConfigError:
    return ConfigError("invalid", why, key="url")


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("http://example.com/x", ("http", "example.com", 80)),
        ("HTTPS://Example.COM:8443/", ("https", "example.com", 8443)),
        ("http://[::1]:2379", ("http", "::1", 2379)),
        ("http://127.0.0.1:1/", ("http", "127.0.0.1", 1)),
        ("http://bücher.example/", ("http", "bücher.example", 80)),
    ],
)
def test_good_urls(text: str, origin: tuple[str, str, int]) -> None:
    assert parse_url(text, config_error).origin == origin


@pytest.mark.parametrize(
    "text",
    [
        "http://[::1",  # malformed IPv6 literal: ValueError in urlsplit
        "http://[::1]:99999/",  # port out of range: ValueError from .port
        "http://host:x/",  # port not a number
        "http://host:0/",
        "http://h\uff0fst/",  # changes under NFKC: ValueError in urlsplit
        "http://" + "a" * 64 + ".example/",  # a label IDNA refuses
        "http://a..b/",
        "http:///path",  # no host
        "ftp://example.com/",
        "http://exa mple.com/",
        "http://example.com/\n",
        " http://example.com/",
        "",
        "http://" + "a" * 9000,
    ],
)
def test_bad_urls_are_the_callers_typed_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_url(text, config_error)
    assert caught.value.kind == "invalid" and caught.value.key == "url"


def test_file_urls_only_where_allowed() -> None:
    with pytest.raises(ConfigError):
        parse_url("file:///srv/repo", config_error)
    url = parse_url("file:///srv/repo", config_error, schemes=("http", "https", "file"))
    assert url == Url("file:///srv/repo", "file", "", None, "/srv/repo", "", "")
    with pytest.raises(ConfigError):
        parse_url("file://elsewhere/srv", config_error, schemes=("file",))


@pytest.mark.fuzz
@given(st.text(max_size=200))
def test_fuzz_any_text(text: str) -> None:
    parse_or_typed_error(lambda: parse_url(text, config_error))


@pytest.mark.fuzz
@given(
    st.sampled_from(["http://", "https://", "file://", "HTTP://"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.one_of(st.none(), st.integers(-10, 100_000).map(str), st.text(max_size=6)),
    st.text(max_size=30),
)
def test_fuzz_url_shaped_text(scheme: str, host: str, port: str | None, path: str) -> None:
    text = scheme + host + ("" if port is None else ":" + port) + "/" + path
    result = parse_or_typed_error(lambda: parse_url(text, config_error, schemes=("http", "https")))
    if isinstance(result, Url):  # what we accept, requests can send
        assert result.port is None or 0 < result.port < 65536
        requests.Request("GET", text).prepare()
