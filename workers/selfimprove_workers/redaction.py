"""The one credential redactor: every message that leaves a process goes through :func:`redact`.

Stage logs (:mod:`.log`), storage errors (:mod:`.storage`), failure summaries and error messages
(:mod:`.runtime`, :mod:`.errors`), the local executor and the CLI all use it; the operator can too.
This module imports only the standard library, so it is safe to import anywhere (the operator
image has no torch, boto3 or pydantic need not be loaded).

What is removed (each replaced by ``***``):

1. **Known values**: the credential environment variables (:data:`CREDENTIAL_ENV`) and any extra
   values the caller hands in (e.g. the frozen credentials of a boto3 session), wherever they
   appear, also URL-encoded (``quote``/``quote_plus``, upper or lower case hex) or JSON-escaped
   (``json.dumps``, once or nested, ``\\/`` and ``\\uXXXX`` escapes). Values shorter than
   :data:`MIN_SECRET_LENGTH` (8) characters are *not* matched by value: a one-letter "secret" would
   otherwise erase every such letter from every message. Real credentials are far longer (AWS key
   ids 20, secrets 40, session tokens hundreds of characters); a short one is still caught when it
   appears in one of the shapes below.
2. **URL userinfo** of any scheme: ``scheme://user:pass@host`` → ``scheme://***@host``, also
   when the password holds an unencoded ``@`` or ``/``.
3. **Credential shapes**, whether or not the value is known:

   - ``Authorization:`` / ``Proxy-Authorization:`` header values (to the end of the line or the
     closing quote), and ``Bearer <token>`` anywhere;
   - ``key = value``, ``key: value``, ``key=value&`` (query parameters), ``"key": "value"``
     (JSON, also escaped inside another JSON string), ``'key': b'value'`` (Python reprs) and
     ``<Key>value</Key>`` (XML) where the key names a credential (:func:`is_credential_key`):
     one of its words is ``secret``/``password``/``passwd``, or its last word is
     ``token``/``signature``/``credential(s)``, or it contains ``api key``/``access key``/
     ``private key``. Keys are split into words at ``_ - .`` and camelCase, so this covers
     ``aws_secret_access_key``, ``SecretAccessKey``, ``SessionToken``, ``X-Amz-Signature``,
     ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``AWSAccessKeyId`` but not ``max_tokens``,
     ``tokenizer``, ``pad_token`` (tokenizer special tokens), ``signature_version``,
     ``secretRef``/``secretName`` (names of Kubernetes Secrets, not their contents);
   - AWS access key ids (``AKIA``/``ASIA`` + 16 upper-case letters or digits) and Hugging Face
     user access tokens (``hf_`` + 30 or more letters and digits).

Guarantees: :func:`redact` never raises (if redacting fails, the message is withheld rather than
shown unredacted) and is idempotent: ``redact(redact(x)) == redact(x)``.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "CREDENTIAL_ENV",
    "MASK",
    "MIN_SECRET_LENGTH",
    "is_credential_key",
    "redact",
    "redact_obj",
    "secret_values",
]

#: Environment variables whose values are credentials: S3's (boto3's standard chain), the
#: Hugging Face token that downloads gated or private hf:// models, and the API keys of a served
#: teacher or judge (constants.TEACHER_API_KEY_ENV, JUDGE_API_KEY_ENV).
CREDENTIAL_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
                  "SELFIMPROVE_TEACHER_API_KEY", "SELFIMPROVE_JUDGE_API_KEY")
#: Values shorter than this are not redacted by value (see the module docstring).
MIN_SECRET_LENGTH = 8
MASK = "***"
_WITHHELD = "[message withheld: credential redaction failed]"


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """The values to redact: the credential env vars and ``extra``, each at least
    MIN_SECRET_LENGTH long, without duplicates, longest first."""
    values: list[Any] = [os.environ.get(k) for k in CREDENTIAL_ENV]
    values.extend(extra or ())
    return sorted(
        {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH and v != MASK},
        key=lambda v: (-len(v), v),
    )


# ------------------------------------------------------------------------------------------
# 1. known values, in any of their encodings


def _hex_class(byte: int) -> str:
    return "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in f"{byte:02X}")


def _char_pattern(c: str) -> str:
    forms = [re.escape(c)]
    encoded = c.encode("utf-8")
    forms.append("".join("%" + _hex_class(b) for b in encoded))  # quote(), any hex case
    if c == " ":
        forms.append(r"\+")  # quote_plus()
    if c in "\"\\/":
        forms.append(r"\\+" + re.escape(c))  # JSON escapes, also nested (\\\" ...)
    if not c.isalnum() or not c.isascii():
        forms.append(r"\\+u" + _hex_class(ord(c) >> 8) + _hex_class(ord(c) & 0xFF))  # \u00XX
    forms.sort(key=len, reverse=True)
    return forms[0] if len(forms) == 1 else "(?:" + "|".join(forms) + ")"


@functools.lru_cache(maxsize=32)
def _values_pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    if not values:
        return None
    return re.compile("|".join("".join(_char_pattern(c) for c in v) for v in values))


# ------------------------------------------------------------------------------------------
# 2. URL userinfo

# The authority runs to the first "/", "?", "#" or blank; userinfo is everything up to its last
# "@" (a password may hold an unencoded "@"). "://" may itself be JSON-escaped (":\/\/").
_URL_USERINFO = re.compile(
    r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*:(?:\\*/){2})(?P<userinfo>[^/?#\s"'<>\\]*(?:\\[^/][^/?#\s"'<>\\]*)*)@"""
)


# A password with an unencoded "/" (an AWS secret pasted as it is): "user:pa/ss@host". It is told
# from "host:port/path@..." by what follows the colon (a port is digits up to the "/").
_URL_USERINFO_SLASH = re.compile(
    r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*:(?:\\*/){2})[^/?#\s"'<>\\:@]*:(?!\d*(?:[/?#\s]|$))"""
    r"""[^?#\s"'<>\\@]*/[^?#\s"'<>\\@]*@"""
)


def _userinfo(m: re.Match[str]) -> str:
    return f"{m['scheme']}{MASK}@"


# ------------------------------------------------------------------------------------------
# 3. credential shapes

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_ANYWHERE = {"secret", "password", "passwd"}
_LAST = {"token", "signature", "credential", "credentials", "authorization"}
_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
# A Kubernetes Secret's name or a reference to a value is not the value.
_NOT_A_VALUE = {"name", "names", "ref", "refs", "file", "path", "env", "arn", "id"}
# Tokenizer special tokens ("pad_token", "eos_token"...) are not credentials.
_TOKENIZER = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "stop", "start", "end"}


def is_credential_key(key: str) -> bool:
    """Whether a key/field/parameter name names a credential (see the module docstring)."""
    words = [w.lower() for w in _WORDS.findall(key)]
    if not words:
        return False
    last = words[-1]
    if "apikey" in words or any(pair in _PAIRS for pair in itertools.pairwise(words)):
        return not (last in _NOT_A_VALUE and last != "id")
    if _ANYWHERE.intersection(words):
        return last not in _NOT_A_VALUE
    if last in _LAST:
        return not (last == "token" and len(words) > 1 and words[-2] in _TOKENIZER)
    return False


_BEARER = re.compile(r"(?<![\w-])(?P<head>(?i:bearer)[ \t]+)(?!\*\*\*)[A-Za-z0-9._~+/-]{8,}=*")
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])")
_XML = re.compile(r"<(?P<key>[A-Za-z][\w.-]*)>(?P<value>[^<]*)</(?P=key)>")

# A key (optionally quoted, the quote optionally escaped) and its separator. The value is parsed
# by hand after it, so that a non-credential key consumes nothing but itself ("https://h/?X-Amz-
# Signature=..." must still find the query parameter).
_KEY_SEP = re.compile(
    r"""(?P<kq>\\*["']?)(?<![\w-])(?P<key>[A-Za-z_][\w-]*)(?P=kq)[ \t]*(?P<sep>[:=])[ \t]*"""
)
_QUOTED = re.compile(r"""b?(?P<q>\\*["'])(?P<value>(?:(?!(?P=q))(?:\\.|[^\\\r\n]))*)(?P=q)""")
# An unquoted value: up to a blank, a quote, a delimiter or a JSON escape of a line break; an
# escape pair (\x) is kept whole so the result stays valid JSON when the text is JSON.
_BARE = re.compile(r"""(?:\\[^nrt\s]|[^\s\\"'`,;&<>(){}\[\]])+""")
# An HTTP Authorization header's value ("AWS4-HMAC-SHA256 Credential=..., Signature=...",
# "Basic ..."): the rest of the line or of the string it is in.
_TO_EOL = re.compile(r"""(?:\\[^nrt"'\s]|[^\\\r\n"'])+""")


def _key_values(text: str) -> str:
    out: list[str] = []
    pos = 0
    while True:
        m = _KEY_SEP.search(text, pos)
        if m is None:
            break
        end = m.end()
        if not is_credential_key(m["key"]) or (m["sep"] == ":" and text.startswith("//", end)):
            out.append(text[pos:end])
            pos = end
            continue
        v = _QUOTED.match(text, end)
        if v is not None:
            out.append(text[pos:v.start("value")] + MASK + text[v.end("value"):v.end()])
            pos = v.end()
            continue
        v = (_TO_EOL if m["key"].lower().endswith("authorization") else _BARE).match(text, end)
        if v is not None:
            out.append(text[pos:end] + MASK)
            pos = v.end()
            continue
        out.append(text[pos:end])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _xml(m: re.Match[str]) -> str:
    if not is_credential_key(m["key"]) or not m["value"]:
        return m.group(0)
    return f"<{m['key']}>{MASK}</{m['key']}>"


def _redact(text: str, extra: Iterable[str | None]) -> str:
    pattern = _values_pattern(tuple(secret_values(extra)))
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL_USERINFO.sub(_userinfo, text)
    text = _URL_USERINFO_SLASH.sub(_userinfo, text)
    text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    text = _XML.sub(_xml, text)
    text = _key_values(text)
    return _HF_TOKEN.sub(MASK, _AWS_KEY_ID.sub(MASK, text))


def redact(text: object, extra: Iterable[str | None] = ()) -> str:
    """``text`` (made a string) without credentials; never raises."""
    try:
        return _redact(text if isinstance(text, str) else str(text), extra)
    except Exception:  # noqa: BLE001 — redaction must never become the error, nor leak one
        try:  # the known values at least, literally
            s = text if isinstance(text, str) else str(text)
            for value in secret_values(extra):
                s = s.replace(value, MASK)
            return _URL_USERINFO.sub(_userinfo, s)
        except Exception:  # noqa: BLE001
            return _WITHHELD


def redact_obj(obj: Any, extra: Iterable[str | None] = ()) -> Any:
    """A JSON-like value with every string redacted and the value of every credential-named key
    replaced by ``***`` (dict keys are redacted too); anything else becomes its redacted str.
    Used on a log record *before* it is serialized, so the output stays valid JSON."""
    try:
        extra = tuple(extra or ())
        if obj is None or isinstance(obj, bool | int | float):
            return obj
        if isinstance(obj, str):
            return redact(obj, extra)
        if isinstance(obj, dict):
            return {
                redact(k, extra): (
                    MASK if isinstance(k, str) and is_credential_key(k) and isinstance(v, str) and v
                    else redact_obj(v, extra)
                )
                for k, v in obj.items()
            }
        if isinstance(obj, list | tuple | set | frozenset):
            return [redact_obj(v, extra) for v in obj]
        return redact(obj, extra)
    except Exception:  # noqa: BLE001
        return _WITHHELD
