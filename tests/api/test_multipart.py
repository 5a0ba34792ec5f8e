"""Intake's multipart/form-data parser: what real clients send, and every way a body can be malformed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import urllib3
from fastapi.testclient import TestClient
from python_multipart.multipart import parse_options_header

from api.multipart import MAX_PARTS, FormPart, MultipartError, boundary_of, parse_form
from tests.api.conftest import ApiTenant
from tests.conftest import make_jpeg

IMAGE = b"\xff\xd8" + os.urandom(5000) + b"\r\n--not-the-boundary\r\n" + os.urandom(100) + b"--xyz"


def encoded_by_httpx(files: dict[str, tuple[str, bytes, str]], data: dict[str, str]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def encoded_by_urllib3(fields: dict[str, object]) -> tuple[bytes, str]:
    body, content_type = urllib3.encode_multipart_formdata(fields)
    return body, content_type


def form(body: bytes, content_type: str) -> dict[str, FormPart]:
    return parse_form(body, boundary_of(content_type))


@pytest.mark.parametrize("client", ["httpx", "urllib3"])
def test_parses_what_common_clients_send(client: str) -> None:
    caption, metadata = "一只猫坐在沙发上 — a cat", '{"lang": "zh"}'
    if client == "httpx":
        body, content_type = encoded_by_httpx(
            {"image": ("猫.jpg", IMAGE, "image/jpeg")}, {"caption": caption, "metadata": metadata}
        )
    else:
        body, content_type = encoded_by_urllib3(
            {"image": ("猫.jpg", IMAGE, "image/jpeg"), "caption": caption, "metadata": metadata}
        )
    parts = form(body, content_type)
    assert set(parts) == {"image", "caption", "metadata"}
    assert parts["image"].data == IMAGE and parts["image"].is_file
    assert parts["image"].content_type == "image/jpeg"
    assert parts["caption"].data.decode() == caption and not parts["caption"].is_file
    assert parts["metadata"].data == metadata.encode()


def test_preamble_epilogue_padding_quoted_boundary_and_header_case() -> None:
    body = (
        b"This is a preamble.\r\n"
        b"--a b:c  \t\r\n"
        b'CONTENT-DISPOSITION: form-data; name="caption"\r\n'
        b"\r\n"
        b"hello\r\n"
        b"--a b:c\r\n"
        b"content-type: image/png\r\n"
        b"Content-Disposition: form-data; name=\"image\"; filename*=UTF-8''%E7%8C%AB.png\r\n"
        b"\r\n"
        b"\x89PNG\r\n--a b:cd not a delimiter line\r\n"
        b"--a b:c--\r\n"
        b"an epilogue\r\n--a b:c\r\nignored\r\n"
    )
    parts = form(body, 'multipart/form-data; boundary="a b:c"')
    assert parts["caption"].data == b"hello"
    assert parts["image"].is_file and parts["image"].content_type == "image/png"
    assert parts["image"].data == b"\x89PNG\r\n--a b:cd not a delimiter line"


def test_empty_parts_and_an_empty_form() -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="caption"\r\n\r\n\r\n--b--\r\n'
    assert form(body, "multipart/form-data; boundary=b")["caption"].data == b""
    assert form(b"--b--\r\n", "multipart/form-data; boundary=b") == {}
    # A look-alike of the first delimiter is part of the preamble.
    assert (
        form(
            b'--bX\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n--b--',
            "multipart/form-data; boundary=b",
        )
        == {}
    )


def test_data_that_repeats_the_delimiter_many_times_is_data() -> None:
    # Past a few look-alikes the parser stops checking them one by one; the result is the same.
    for repeats in (3, 8, 9, 5000):
        data = b"\x00\r\n--bZ" * repeats + b"\r\n--b\t\x00"
        body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n' + data
        parts = form(
            body + b"\r\n--b \r\n" + _part("caption")[5:] + b"--b--", "multipart/form-data; boundary=b"
        )
        assert parts["image"].data == data and parts["caption"].data == b"x"


@pytest.mark.parametrize(
    "disposition",
    [
        b'form-data; name="image"; filename="cat.jpg"',
        b'form-data; name="caption"',
        b'form-data; name=""; filename=""',
        b'form-data; name="a;b"; filename="x; y=z.jpg"',
        b'form-data; name="\xe7\x8c\xab"; filename="\xe7\x8c\xab.jpg"',
        b'form-data; name="a\\"b"',  # an escaped quote: the general parser
        b'form-data; name="x"; filename="C:\\dir\\cat.jpg"',  # a Windows path: the general parser
        b'form-data; filename="cat.jpg"; name="image"',  # another order: the general parser
        b"form-data; name=caption",  # unquoted: the general parser
        b'Form-Data; Name="caption"',
    ],
)
def test_common_spellings_parse_as_the_general_parser_does(disposition: bytes) -> None:
    body = b"--b\r\nContent-Disposition: " + disposition + b"\r\n\r\nx\r\n--b--"
    (part,) = form(body, "multipart/form-data; boundary=b").values()
    _, params = parse_options_header(disposition)
    expected_name, expected_file = params[b"name"], params.get(b"filename")
    assert (part.name, part.filename) == (
        expected_name.decode(),
        None if expected_file is None else expected_file.decode(),
    )
    for content_type in (
        "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
        "multipart/form-data;boundary=a'()+_,./:=?-9",
        'multipart/form-data; boundary="a b:c"',
        "Multipart/Form-Data; Boundary=abc; charset=utf-8",
    ):
        assert boundary_of(content_type) == parse_options_header(content_type)[1][b"boundary"]


def _part(name: str, data: bytes = b"x") -> bytes:
    return b'--b\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + data + b"\r\n"


MALFORMED = {
    "empty body": b"",
    "no delimiter": b"just some bytes",
    "no closing delimiter": _part("caption")[:-2],
    "truncated in a part": b'--b\r\nContent-Disposition: form-data; name="caption"\r\n\r\nhel',
    "only a look-alike of a delimiter": b'--bX\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n--bY',
    "no headers": b"--b\r\n\r\nx\r\n--b--",
    "no content-disposition": b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--",
    "not form-data": b'--b\r\nContent-Disposition: attachment; name="a"\r\n\r\nx\r\n--b--',
    "no field name": b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
    "header without a colon": b'--b\r\nContent-Disposition: form-data; name="a"\r\nbogus\r\n\r\nx\r\n--b--',
    "headers never end": b'--b\r\nContent-Disposition: form-data; name="a"\r\nX: '
    + b"y" * 9000
    + b"\r\n--b--",
    "headers run into the next delimiter": b'--b\r\nContent-Disposition: form-data; name="a"\r\n--b--',
    "a field twice": _part("caption") + _part("caption") + b"--b--",
    "too many parts": b"".join(_part(f"f{i}") for i in range(MAX_PARTS + 1)) + b"--b--",
    "field name not utf-8": b'--b\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nx\r\n--b--',
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bodies_are_a_clear_400(case: str) -> None:
    with pytest.raises(MultipartError) as err:
        form(MALFORMED[case], "multipart/form-data; boundary=b")
    assert (err.value.status_code, err.value.code) == (400, "invalid_multipart")


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=" + "x" * 71],
)
def test_a_missing_or_bad_boundary_is_a_400(content_type: str) -> None:
    with pytest.raises(MultipartError):
        boundary_of(content_type)


def test_through_the_api_a_malformed_body_is_a_400_and_the_service_keeps_serving(
    client: TestClient, tenant: ApiTenant
) -> None:
    for body in (MALFORMED["no closing delimiter"], MALFORMED["a field twice"]):
        res = client.post(
            "/v1/submissions",
            content=body,
            headers={**tenant.headers, "content-type": "multipart/form-data; boundary=b"},
        )
        assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_multipart"
    res = client.post(
        "/v1/submissions",
        content=b"--b--",
        headers={**tenant.headers, "content-type": "multipart/form-data"},
    )
    assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_multipart"
    ok = client.post(
        "/v1/submissions",
        files={"image": ("x.jpg", make_jpeg(), "image/jpeg")},
        data={"caption": "still serving"},
        headers=tenant.headers,
    )
    assert ok.status_code == 202


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(
    client: TestClient, tenant: ApiTenant, settings: object
) -> None:
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n\xff\xd8\xff'
        for _ in range(64):  # 64 MiB in all, without a Content-Length
            sent.append(1)
            yield b"\0" * (1 << 20)

    for content_type in ("multipart/form-data; boundary=b", "application/json"):
        sent.clear()
        res = client.post(
            "/v1/submissions", content=chunks(), headers={**tenant.headers, "content-type": content_type}
        )
        assert res.status_code == 413 and res.json()["error"]["code"] == "payload_too_large"
        assert "content-length" not in {k.lower() for k in res.request.headers}
