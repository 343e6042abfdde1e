"""features.py: decoding, bounds, artefact removal and robustness on hostile input."""

from __future__ import annotations

import base64

import pytest

from relay.classifier.features import Extractor, FeatureSettings


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return Extractor()


def _mail(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + body


def test_mbox_from_line_is_dropped(extractor: Extractor) -> None:
    plain = _mail("From: Ann <ann@example.org>\nSubject: hello there\n", b"body words\r\n")
    boxed = b"From ann@example.org  Mon Jan  1 00:00:00 2024\n" + plain
    a, b = extractor.extract_bytes(plain), extractor.extract_bytes(boxed)
    assert a == b
    assert a.text.startswith("hello there")
    assert "subj:hello" in a.meta.split()


def test_bogus_charset_and_8bit_header_are_decoded(extractor: Extractor) -> None:
    raw = (
        b"From: x@shop.test\r\nSubject: Caf\xc3\xa9 offer\r\n"
        b"Content-Type: text/plain; charset=no-such-charset\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    )
    feats = extractor.extract_bytes(raw)
    assert "Café offer" in feats.text
    assert "Grüße aus Köln" in feats.text
    assert feats.degraded  # the declared charset was unusable
    assert "charset:bogus" in feats.meta.split()


def test_encoded_word_subject_with_unknown_charset(extractor: Extractor) -> None:
    raw = _mail("Subject: =?x-bogus?Q?cheap_pills?= now\n", b"text\r\n")
    assert "cheap" in extractor.extract_bytes(raw).text


def test_html_rendered_by_parser_and_urls_tokenised(extractor: Extractor) -> None:
    html = (
        b"<html><head><style>.x{color:red}</style></head><body>"
        b"<script>var secret='scriptword';</script>"
        b"<p>Claim your <b>prize</b> today</p>"
        b'<a href="http://login.evil-bank.test/x">https://www.mybank.com/</a>'
        b'<a href="http://192.0.2.7:8080/p">here</a><img src="a.gif"></body></html>'
    )
    raw = _mail("From: a@b.test\nSubject: s\nContent-Type: text/html\n", html)
    feats = extractor.extract_bytes(raw)
    tokens = feats.meta.split()
    assert "Claim your prize today" in feats.text
    assert "scriptword" not in feats.text and "color" not in feats.text
    assert {"html:only", "url:site_evil-bank.test", "url:anchor_mismatch"} <= set(tokens)
    assert {"url:ip", "url:port", "html:img_1"} <= set(tokens)


def test_corpus_artefacts_never_become_features(extractor: Extractor) -> None:
    raw = _mail(
        "From: zzzz@spamassassin.taint.org\nTo: yyyy@example.com\nSubject: hi\n"
        "X-Mailer: Microsoft Outlook Express 6.00.2600.0000\n",
        b"see http://spamassassin.taint.org/x and mail zzzz@localhost.taint.org ok\r\n",
    )
    feats = extractor.extract_bytes(raw)
    assert "taint" not in feats.text and "zzzz" not in feats.text
    assert "taint" not in feats.meta and "zzzz" not in feats.meta
    assert "mailer:outlook" in feats.meta.split()  # the family, never the version
    assert "2600" not in feats.meta


def test_attachments_are_skipped(extractor: Extractor) -> None:
    secret = base64.b64encode(b"attachmentsecretword " * 50)
    raw = _mail(
        'Subject: report\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment\r\n\r\n" + secret + b"\r\n--b--\r\n",
    )
    feats = extractor.extract_bytes(raw)
    assert "see attached" in feats.text
    assert "attachmentsecretword" not in feats.text
    assert "att:application" in feats.meta.split()
    assert not feats.degraded


def test_text_is_bounded() -> None:
    small = Extractor(FeatureSettings(max_text_kb=1))
    raw = _mail("Subject: long\n", b"word " * 10000)
    assert len(small.extract_bytes(raw).text) <= 1024


def test_raw_size_is_bounded() -> None:
    small = Extractor(FeatureSettings(max_raw_kb=2))
    raw = _mail("Subject: big\n", b"early words\r\n" + b"x" * 5000 + b"\r\nlateword\r\n")
    feats = small.extract_bytes(raw)
    assert "early words" in feats.text and "lateword" not in feats.text
    assert "size:truncated" in feats.meta.split()


def test_broken_mime_still_yields_text(extractor: Extractor) -> None:
    raw = _mail(
        "Subject: broken\nContent-Type: multipart/alternative\n",  # no boundary at all
        b"--zz\r\nContent-Type: text/plain\r\n\r\nbuy cheap watches\r\n",
    )
    feats = extractor.extract_bytes(raw)
    assert "buy cheap watches" in feats.text
    assert feats.degraded
    assert "mime:defect" in feats.meta.split()


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00\xff\xfe garbage \x80\x81", b"no header at all\n\njust text", b"\r\n\r\n\r\n"],
)
def test_unparsable_input_degrades_but_never_raises(extractor: Extractor, raw: bytes) -> None:
    feats = extractor.extract_bytes(raw)
    assert feats.degraded
    assert isinstance(feats.text, str) and isinstance(feats.meta, str)


def test_sender_shape_tokens(extractor: Extractor) -> None:
    raw = _mail(
        "From: Deals <promo12345@deals-4-you.net>\nReply-To: x@other.test\n"
        "Received: from a by b\nReceived: from c by d\nTo: a@x.test, b@x.test\nSubject: s\n",
        b"hi\r\n",
    )
    tokens = set(extractor.extract_bytes(raw).meta.split())
    assert {
        "from:named",
        "from:local_digits",
        "from:domain_hyphen",
        "from:reply_elsewhere",
    } <= tokens
    assert {"from:tld_net", "rcpts:2-3", "mailer:none"} <= tokens
    # Received fields describe the collection path (the relay sees fewer than the final
    # mailbox does): not a feature since features version 2.
    assert not any(t.startswith("hops:") for t in tokens)


def test_settings_round_trip_through_the_card() -> None:
    s = FeatureSettings(max_text_kb=8, max_raw_kb=100)
    assert FeatureSettings.from_dict({**s.as_dict(), "unrelated": 1}) == s


def test_log_line_before_the_header_is_skipped(extractor: Extractor) -> None:
    # modern-dev: a tool's log line was written into 126 files before the header.
    raw = "\u2705 Loading configuration: x.toml\n".encode() + _mail(
        "From: Shop <news@shop.test>\nSubject: weekly deals\n", b"hello\r\n"
    )
    feats = extractor.extract_bytes(raw)
    assert feats.text.startswith("weekly deals") and not feats.degraded
    assert feats.sender_site == "shop.test"


def test_hidden_text_tricks_and_zero_width_characters(extractor: Extractor) -> None:
    html = (
        '<div style="display:none">hidden preheader</div>'
        '<span style="font-size:0px;">x</span><p style="color:#ffffff">white</p>'
        "<p>Pay\u200bPal acc\u200bount</p>"
    ).encode()
    raw = _mail("From: a@b.test\nSubject: s\nContent-Type: text/html; charset=utf-8\n", html)
    feats = extractor.extract_bytes(raw)
    tokens = set(feats.meta.split())
    assert {"html:hidden", "html:tiny_font", "html:white_text", "text:zero_width_1-3"} <= tokens
    assert "PayPal account" in feats.text  # the word filter sees the words again
    plain = extractor.extract_bytes(
        _mail("Subject: s\nContent-Type: text/html\n", b'<p style="color:#333">x</p>')
    )
    assert not {"html:hidden", "html:white_text", "html:tiny_font"} & set(plain.meta.split())


def test_url_domains_relative_to_the_sender(extractor: Extractor) -> None:
    html = (
        b'<a href="https://click.news.shop.co.uk/t/1">Shop</a>'
        b'<a href="https://bit.ly/abc">here</a>'
        b'<a href="https://evil.web.app/login">login</a>'
    )
    raw = _mail("From: Shop <news@mail.shop.co.uk>\nSubject: s\nContent-Type: text/html\n", html)
    feats = extractor.extract_bytes(raw)
    tokens = set(feats.meta.split())
    assert feats.sender_site == "shop.co.uk"
    assert {"url:site_shop.co.uk", "url:shortener", "url:free_host", "url:to_sender"} <= tokens
    assert {"url:sites_3-4", "url:site_bit.ly", "url:site_evil.web.app"} <= tokens
    lure = extractor.extract_bytes(
        _mail(
            "From: Bank <info@bank.test>\nSubject: s\n",
            b"log in at http://198.51.100.7/bank now\r\n",
        )
    )
    assert {"url:ip", "url:all_http"} <= set(lure.meta.split())
    assert "url:to_sender" not in lure.meta.split()


def test_attachment_types_are_tokens_and_never_read(extractor: Extractor) -> None:
    secret = base64.b64encode(b"<html>smuggled secretword</html>")
    raw = _mail(
        'Subject: invoice\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b'--b\r\nContent-Type: text/html; name="Invoice.HTM"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="Invoice.HTM"\r\n\r\n'
        + secret
        + b"\r\n--b\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="statement.pdf"\r\n\r\nJVBERi0=\r\n--b--\r\n',
    )
    feats = extractor.extract_bytes(raw)
    tokens = set(feats.meta.split())
    assert {"att_ext:htm", "att:risky", "att_type:text/html"} <= tokens
    assert {"att_ext:pdf", "att_type:application/pdf"} <= tokens
    assert "secretword" not in feats.text


def test_bulk_headers_dkim_alignment_and_display_name(extractor: Extractor) -> None:
    newsletter = _mail(
        "From: Shop News <news@shop.test>\nSubject: s\n"
        "List-Unsubscribe: <https://shop.test/u?x=1>, <mailto:u@shop.test>\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\nFeedback-ID: 1:2:esp\n"
        "DKIM-Signature: v=1; a=rsa-sha256; d=mail.shop.test; s=k; bh=x; b=y\n",
        b"hi\r\n",
    )
    tokens = set(extractor.extract_bytes(newsletter).meta.split())
    assert {"list:unsubscribe", "list:unsubscribe_web", "list:unsubscribe_mailto"} <= tokens
    assert {"list:one_click", "bulk:feedback_id", "dkim:aligned", "from:name_in_address"} <= tokens
    lure = _mail(
        "From: PayPal.com Support <a1@random-host.test>\nSubject: s\n"
        "Reply-To: x@gmail.com\n"
        "DKIM-Signature: v=1; a=rsa-sha1; d=other.test; s=k; bh=x; b=y\n",
        b"hi\r\n",
    )
    tokens = set(extractor.extract_bytes(lure).meta.split())
    assert {"from:name_other_domain", "from:name_not_in_address", "from:reply_freemail"} <= tokens
    assert {"dkim:other", "dkim:sha1"} <= tokens and "list:unsubscribe" not in tokens
    bare = set(
        extractor.extract_bytes(_mail("From: a@b.test\nSubject: s\n", b"x\r\n")).meta.split()
    )
    assert "dkim:none" in bare


def test_styled_letters_in_subject_and_name(extractor: Extractor) -> None:
    raw = _mail(
        "From: =?utf-8?b?8J2XpvCdl7XwnZe2?= <a@b.test>\n"
        "Subject: =?utf-8?b?8J2XpvCdl7XwnZe28J2XvfCdl73wnZey8J2XuyDwn5qa?=\n",
        b"x\r\n",
    )
    tokens = set(extractor.extract_bytes(raw).meta.split())
    assert {"subj:styled_letters", "subj:emoji", "from:name_styled_letters"} <= tokens
