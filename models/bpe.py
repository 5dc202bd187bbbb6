"""Token ids from OpenAI-protocol clients, decoded back to the text they were made from.

LangChain's ``OpenAIEmbeddings`` (with its default ``check_embedding_ctx_length=True``) does not send text: it
tokenises each input with tiktoken, using the encoding tiktoken maps the ``model`` name to or, for a name it
does not know (``active``, an adapter's name), ``cl100k_base``, and sends the ids. BPE decoding gives back the
exact bytes it encoded, so decoding with the same rule recovers the text, which is then embedded as usual (long
texts windowed). TEI decodes such ids with its own model's tokenizer instead, which silently gives other text.

Only ``cl100k_base`` ships (``data/cl100k_base.tiktoken``, the file tiktoken downloads, checked against the
sha256 tiktoken pins when it is loaded), so nothing is fetched at run time; a model name tiktoken maps to another
encoding is refused with what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from embedlift.models.errors import InvalidInputError

ENCODING = "cl100k_base"
DATA = Path(__file__).resolve().parent / "data" / f"{ENCODING}.tiktoken"
#: tiktoken's own pin for the file (``tiktoken_ext/openai_public.py``).
SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# cl100k_base's split pattern and special tokens, as tiktoken_ext.openai_public defines them
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


@cache
def cl100k_base() -> Any:
    """The encoding, from the shipped file (its sha256 checked: a damaged file is an error, never other ids)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(DATA), expected_hash=SHA256)
    return tiktoken.Encoding(name=ENCODING, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL)


def encoding_for(model: str) -> Any:
    """LangChain's rule: the encoding tiktoken maps ``model`` to if it knows the name, else ``cl100k_base``.

    Raises:
        InvalidInputError: ``model`` maps to an encoding that is not shipped.
    """
    from tiktoken.model import encoding_name_for_model

    try:
        name = encoding_name_for_model(model)
    except KeyError:
        name = ENCODING
    if name != ENCODING:
        raise InvalidInputError(
            f"model {model!r} tokenises with {name}, which this server does not decode; send text, or ids of {ENCODING} "
            f"(LangChain: set tiktoken_model_name to a model that uses {ENCODING}, or check_embedding_ctx_length=False)"
        )
    return cl100k_base()


def is_token_ids(value: Any) -> bool:
    """Whether ``input`` is token ids (one list of ints, or a list of them) rather than text."""
    if isinstance(value, str) or not isinstance(value, list) or not value:
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(isinstance(v, list) for v in value)


def decode(value: list[Any], model: str) -> tuple[list[str], int]:
    """The texts of ``input`` given as ids (``list[int]`` or ``list[list[int]]``) and the number of ids.

    Raises:
        InvalidInputError: An id that is not an integer of the encoding, naming its position.
    """
    flat = not isinstance(value[0], list)
    rows: Sequence[Any] = [value] if flat else value
    encoding = encoding_for(model)
    texts, count = [], 0
    for i, ids in enumerate(rows):
        where = "input" if flat else f"input[{i}]"
        if not isinstance(ids, list) or not ids:
            raise InvalidInputError(f"{where} must be a non-empty list of token ids (or send text)", field=where)
        for j, token in enumerate(ids):
            if not isinstance(token, int) or isinstance(token, bool) or not _valid(encoding, token):
                raise InvalidInputError(f"{where}[{j}] = {token!r} is not a token id of {encoding.name} (0 to {encoding.n_vocab - 1}, "
                                        f"the ids tiktoken gives); send text, or the ids of {encoding.name}", field=f"{where}[{j}]")
        texts.append(encoding.decode_bytes(ids).decode("utf-8", errors="replace"))
        count += len(ids)
    return texts, count


def _valid(encoding: Any, token: int) -> bool:
    if not 0 <= token < encoding.n_vocab:
        return False
    try:
        encoding.decode_single_token_bytes(token)
    except KeyError:
        return False
    return True
