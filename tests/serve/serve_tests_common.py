"""A tokenizer stand-in for engine tests on the tiny random models (vocabulary of 128 ids)."""

from __future__ import annotations


class Tok:
    """Encodes space-separated integers and decodes ids back to them: enough to test text, stop strings and
    streaming without a real vocabulary."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(f" {i}" for i in ids)
