"""From rewriting (relay.intake.rewrite): display names kept as written, original in Reply-To, nothing else."""

from __future__ import annotations

import email
import email.policy

import pytest

from relay.intake.rewrite import HeaderRewriter, display_part, from_addresses, new_from_value, split_header_fields

MBX = "relay@contoso.com"


def rewrite(headers: bytes) -> bytes:
    return HeaderRewriter(MBX).rewrite(headers)


def parsed(block: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(block + b"body\r\n", policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


@pytest.mark.parametrize(("from_value", "display"), [
    (b'"Doe, Jane" <jane@fabrikam.example>', b'"Doe, Jane"'),
    (b'"Jane \\"JD\\" Doe" <jane@fabrikam.example>', b'"Jane \\"JD\\" Doe"'),
    (b"=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@fabrikam.example>", b"=?utf-8?q?J=C3=B6rg_M=C3=BCller?="),
    (b"=?ISO-8859-1?B?SvZyZw==?= <joerg@fabrikam.example>", b"=?ISO-8859-1?B?SvZyZw==?="),
    ('"Müller, Jörg" <joerg@fabrikam.example>'.encode(), '"Müller, Jörg"'.encode()),  # raw UTF-8 + comma
    ('"Jörg Müller" <joerg@fabrikam.example>'.encode(), '"Jörg Müller"'.encode()),
    ("山田 太郎 <taro@fabrikam.example>".encode(), "山田 太郎".encode()),
    (b"Plain Name <p@fabrikam.example>", b"Plain Name"),
    (b"p@fabrikam.example (Comment Name)", b"Comment Name"),
    (b"<p@fabrikam.example>", b""),
    (b"p@fabrikam.example", b""),
])
def test_display_name_kept_original_in_reply_to(from_value: bytes, display: bytes | None) -> None:
    block = b"Subject: s\r\nFrom: " + from_value + b"\r\nTo: x@y.example\r\n\r\n"
    out = rewrite(block)
    fields = split_header_fields(out)
    from_field = next(f for f in fields if f.lower().startswith(b"from:"))
    reply_to = next(f for f in fields if f.lower().startswith(b"reply-to:"))
    assert from_addresses(from_field) == (MBX,)
    if display is not None:
        expected = (display + b" <" + MBX.encode() + b">") if display else b"<" + MBX.encode() + b">"
        assert from_field == b"From: " + expected + b"\r\n"
    assert reply_to == b"Reply-To: " + from_value + b"\r\n"
    # what a mail client shows: the same display name, now with the mailbox address
    msg = parsed(out)
    original = parsed(block)
    assert msg["From"].addresses[0].addr_spec == MBX
    if original["From"].addresses[0].display_name:
        assert msg["From"].addresses[0].display_name == original["From"].addresses[0].display_name
    assert msg["Reply-To"].addresses[0].addr_spec == original["From"].addresses[0].addr_spec
    assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1


def test_unquoted_comma_is_two_mailboxes_and_rewrites_to_one() -> None:
    """``Jörg Müller, Ops <j@x>`` is a list (RFC 5322): rewritten to the mailbox alone, original in Reply-To."""
    out = rewrite("From: Jörg Müller, Ops <joerg@fabrikam.example>\r\n\r\n".encode())
    from_field, reply_to = split_header_fields(out)[:2]
    assert from_addresses(from_field) == (MBX,)
    assert reply_to == "Reply-To: Jörg Müller, Ops <joerg@fabrikam.example>\r\n".encode()


def test_other_fields_and_order_untouched() -> None:
    block = (b"Received: by app\r\nFrom: A <a@fabrikam.example>\r\nSubject: =?utf-8?q?h=C3=A9?=\r\n"
             b"X-Long: one\r\n two\r\n\r\n")
    out = rewrite(block)
    assert out == (b"Received: by app\r\nFrom: A <relay@contoso.com>\r\nSubject: =?utf-8?q?h=C3=A9?=\r\n"
                   b"X-Long: one\r\n two\r\nReply-To: A <a@fabrikam.example>\r\n\r\n")


def test_existing_reply_to_is_kept() -> None:
    out = rewrite(b"From: A <a@fabrikam.example>\r\nReply-To: help@fabrikam.example\r\n\r\n")
    assert out == b"From: A <relay@contoso.com>\r\nReply-To: help@fabrikam.example\r\n\r\n"


def test_folded_from_is_unfolded() -> None:
    out = rewrite(b'From: "Very Long Display Name"\r\n <a@fabrikam.example>\r\n\r\n')
    assert out.startswith(b'From: "Very Long Display Name" <relay@contoso.com>\r\n')
    assert b'Reply-To: "Very Long Display Name" <a@fabrikam.example>\r\n' in out


def test_missing_from_gets_the_mailbox() -> None:
    assert rewrite(b"Subject: s\r\n\r\n") == b"Subject: s\r\nFrom: <relay@contoso.com>\r\n\r\n"


@pytest.mark.parametrize("value", [
    '<ceo@contoso.com>, "x" <y@fabrikam.example>',     # two addresses: the display of one must not carry the other
    '"x" <y@fabrikam.example>, <ceo@contoso.com>',
    'ceo@contoso.com <y@fabrikam.example>',
    '"a <ceo@contoso.com>" <y@fabrikam.example>',
    'Name <ceo@contoso.com> <y@fabrikam.example>',
    'group: ceo@contoso.com, y@fabrikam.example;',
])
def test_rewritten_from_never_keeps_another_address(value: str) -> None:
    out = rewrite(f"From: {value}\r\n\r\n".encode())
    from_field = split_header_fields(out)[0]
    assert from_addresses(from_field) == (MBX,), from_field
    msg = parsed(out)
    assert [a.addr_spec for a in msg["From"].addresses] == [MBX]


@pytest.mark.parametrize(("value", "expected"), [
    ('"Doe, Jane" <Jane@Fabrikam.example>', ("jane@fabrikam.example",)),
    ("a@x.example, b@y.example", ("a@x.example", "b@y.example")),
    ("=?utf-8?q?ceo=40contoso.com?= <y@fabrikam.example>", ("y@fabrikam.example",)),
    ("alice@example.org <evil@x.example>", None),  # parsers disagree: ambiguous
    ("ceo@contoso.com@evil.example", None),
    ("undisclosed-recipients:;", None),
    ("", None),
    ("x <a@b.example", None),
])
def test_from_addresses(value: str, expected: tuple[str, ...] | None) -> None:
    raw = f"From: {value}\r\n".encode()
    assert from_addresses(raw) == expected
    assert from_addresses(raw) == expected, "the remembered answer is the same"
    long = f"From: {value}{' ' * 600}\r\n".encode()  # too long to be remembered: parsed every time
    assert from_addresses(long) == expected


def test_new_from_value_quotes_when_needed() -> None:
    assert new_from_value("Jane <j@x.example>", MBX) == f"Jane <{MBX}>"
    assert new_from_value("j@x.example (Doe, Jane)", MBX) == f'"Doe, Jane" <{MBX}>'
    assert display_part('"a <b> c" <real@x.example>') == '"a <b> c"'


def test_lf_only_headers() -> None:
    out = rewrite(b"From: A <a@fabrikam.example>\nSubject: s\n\n")
    assert out == b"From: A <relay@contoso.com>\nSubject: s\nReply-To: A <a@fabrikam.example>\n\n"
