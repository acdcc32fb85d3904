"""The shared text normaliser (hdmole.data.text) on concrete examples."""
import pytest

from hdmole.data.text import normalize_text, unsupported_chars


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("你好，世界！", "你好世界"),  # full-width punctuation
        ("你好, 世界!", "你好世界"),  # half-width punctuation and spaces
        ("ＡＢＣ１２３ｘｙｚ", "ABC123XYZ"),  # width folding + upper case
        ("我用iPhone打电话。", "我用IPHONE打电话"),
        ("<SPOKEN_NOISE>我们<SIL>走吧<PERIOD>", "我们走吧"),  # KeSpeech tags
        ("“引号”《书名》、顿号…", "引号书名顿号"),
        ("  \t\u3000 ", ""),  # ideographic space only
        ("百分之5%+", "百分之5"),  # symbols dropped as well
    ],
)
def test_normalize_examples(raw, expected):
    assert normalize_text(raw) == expected


def test_traditional_to_simplified_is_optional():
    assert normalize_text("這個問題很難") == "這個問題很難"
    assert normalize_text("這個問題很難", traditional_to_simplified=True) == "这个问题很难"


def test_normalize_is_idempotent():
    for raw in ("你好，ＡＢ！", "<NOISE>他们 是 学生。", "Mixed 中文 text?"):
        once = normalize_text(raw)
        assert normalize_text(once) == once


def test_unsupported_chars():
    assert unsupported_chars("你好ABC123") == []
    # the emoji is a symbol (dropped by the normaliser); Cyrillic letters are unsupported
    assert unsupported_chars(normalize_text("дА你好😀")) == ["А", "Д"]
    assert unsupported_chars("かな漢字") == ["か", "な"]
