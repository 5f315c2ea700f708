"""Personal data found and redacted by kind, in Chinese and English text, and look-alikes
(a bad checksum, a time, a version number, an order number) left alone."""

from __future__ import annotations

import pytest

from lmops import pii

ID = "11010519491231002X"  # a valid resident identity number (checksum X)
CARD = "6222021234567890128"  # passes Luhn


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"手机13812345678，身份证{ID}。", "手机[PHONE]，身份证[ID]。"),
        (f"卡号{CARD}，发货快", "卡号[CARD]，发货快"),
        ("卡号 6222 0212 3456 7890 128 谢谢", "卡号 [CARD] 谢谢"),
        ("Call +86 138-1234-5678 today", "Call [PHONE] today"),
        ("mail zhang.san@example.com.cn, 很好", "mail [EMAIL], 很好"),
        ("from 192.168.1.20 and 2001:db8::1.", "from [IP] and [IP]."),
        ("服务器fe80::1挂了", "服务器[IP]挂了"),
    ],
)
def test_each_kind_is_replaced_by_its_placeholder(text: str, redacted: str) -> None:
    assert pii.redact(text)[0] == redacted


@pytest.mark.parametrize(
    "text",
    [
        "订单号110105194912310021",  # 18 digits, wrong ID checksum, fails Luhn
        "card 4111111111111112",  # one digit off a Luhn-valid number
        "12:30:45 到货, 版本 v999.1.1.1",
        "std::bad_alloc and a::b",
        "2026-12-03 买的, 价格 12345678",
        "phone 23812345678",  # no mainland mobile number starts with 2
        "email@localhost",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert pii.redact(text) == (text, {})


def test_counts_by_kind_across_texts() -> None:
    texts = ["13812345678 和 13912345678", f"{ID}", "nothing here", "a@b.io"]
    assert pii.count(texts) == {"PHONE": 2, "ID": 1, "EMAIL": 1}
    text, counts = pii.redact(texts[0])
    assert text == "[PHONE] 和 [PHONE]" and counts == {"PHONE": 2}


def test_an_id_that_also_passes_luhn_is_an_id() -> None:
    from stdnum import luhn

    assert not luhn.is_valid(ID)  # a check that the case below is meaningful
    ids = [f"11010519491231{n:03d}" for n in range(1000)]
    both = [
        number + check
        for number in ids
        for check in "0123456789X"
        if pii._is_ric(number + check) and check != "X" and luhn.is_valid(number + check)
    ]
    assert both, "no ID number here passes Luhn too"
    assert pii.find(f"号码{both[0]}") == [("ID", 2, 20)]
