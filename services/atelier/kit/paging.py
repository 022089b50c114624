"""AIP-158 pagination shared by every List RPC: page sizes and opaque page tokens."""

from __future__ import annotations

import base64

from atelier.kit.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int) -> int:
    """The effective page size: default 50, at most 500; negative is INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def decode_page_token(token: str) -> int:
    """The offset a token stands for (0 for the first page)."""
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
        if kind != "o" or offset < 0:
            raise ValueError
        return offset
    except ValueError:
        raise InvalidArgument.field("page_token", "is not a token from this API") from None


def check_page_request(requested_size: int, token: str) -> None:
    """Validate a List request's page size and token before any work is done:
    INVALID_ARGUMENT naming the field."""
    page_size(requested_size)
    decode_page_token(token)


def paginate(items: list, requested_size: int, token: str) -> tuple[list, str]:
    """One page of ``items`` and the token of the next page ('' on the last)."""
    size = page_size(requested_size)
    offset = decode_page_token(token)
    page = items[offset : offset + size]
    next_token = encode_page_token(offset + size) if offset + size < len(items) else ""
    return page, next_token
