"""Request limits, checked first, before any work; every message states the limit and the value, and names the
setting that raises it (TEI's convention: "batch size 40 > maximum allowed batch size 32")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from embedlift.models.errors import InvalidInputError, TooLargeError
from embedlift.service.collections.filters import nul_in
from embedlift.service.schemas import Document, is_blank
from embedlift.service.settings import Settings


def check_texts(texts: Sequence[str], settings: Settings, what: str = "input", *, allow_blank: bool = False) -> None:
    """Inputs of an embedding or search request: not empty, not blank (unless ``allow_blank``: text decoded from
    token ids is what the client tokenised, whitespace included), within the count and size limits."""
    if not texts:
        raise InvalidInputError(f"{what} is empty; send a string or a non-empty list of strings", field=what)
    if len(texts) > settings.max_inputs:
        raise TooLargeError(
            f"{len(texts)} inputs > maximum allowed {settings.max_inputs} per request (and at most {settings.max_request_tokens} tokens); split the batch",
            field=what,
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise TooLargeError(f"{what}[{i}] has {len(text)} characters > maximum allowed {settings.max_input_chars}; split it", field=f"{what}[{i}]")
        if is_blank(text) and not allow_blank:
            raise InvalidInputError(f"{what}[{i}] is empty; every input must contain text", field=f"{what}[{i}]")


def check_request_tokens(tokens: int, inputs: int, settings: Settings) -> None:
    """An embedding request's total tokens (its inputs as the model tokenises them, every window counted)."""
    if tokens > settings.max_request_tokens:
        raise TooLargeError(
            f"the request's {inputs} inputs hold {tokens} tokens > maximum allowed {settings.max_request_tokens} tokens per request "
            f"(and at most {settings.max_inputs} inputs); split the batch"
        )


def check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise TooLargeError(f"k={k} > maximum allowed {settings.max_k}", field="k")


def check_search(k: int, offset: int, alpha: float | None, settings: Settings) -> None:
    """A search's page and fusion weight (the HTTP body is checked by its schema; the engine's callers too)."""
    check_k(k, settings)
    if offset < 0:
        raise InvalidInputError(f"offset must be >= 0, got {offset}", field="offset")
    if k + offset > settings.max_k:
        raise TooLargeError(f"k + offset = {k + offset} > maximum allowed {settings.max_k}; page with a smaller offset", field="offset")
    if alpha is not None and not 0 <= alpha <= 1:
        raise InvalidInputError(f"alpha must be between 0 and 1 (the dense weight), got {alpha}", field="alpha")


def check_documents(docs: Sequence[Document], settings: Settings) -> None:
    """An upsert: the document count, each text's size, no blank text, no U+0000, ids unique within the request."""
    if len(docs) > settings.max_documents:
        raise TooLargeError(f"{len(docs)} documents > maximum allowed {settings.max_documents} per request; split the upsert", field="documents")
    for i, d in enumerate(docs):
        if len(d.text) > settings.max_input_chars:
            raise TooLargeError(f"documents[{i}] ({d.id!r}) has {len(d.text)} characters > maximum allowed {settings.max_input_chars}; split it", field=f"documents[{i}].text")
        if is_blank(d.text):
            raise InvalidInputError(f"documents[{i}] ({d.id!r}) has empty text; every document must contain text", field=f"documents[{i}].text")
        if (part := nul_in(d.id, d.text, d.metadata)) is not None:
            raise InvalidInputError(
                f"documents[{i}] ({d.id!r}): its {part} contains the character U+0000, which collections do not store "
                "(PostgreSQL cannot, and SQLite's JSON functions cut strings at it); remove it", field=f"documents[{i}].{part}",
            )
    if dupes := sorted(doc_id for doc_id, n in Counter(d.id for d in docs).items() if n > 1):
        raise InvalidInputError(f"document ids must be unique in one upsert; repeated: {dupes[:5]}", field="documents")
