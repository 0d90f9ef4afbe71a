"""A byte-level tokenizer for the zoo's byte models: ids 0-255 are the UTF-8 bytes, special tokens follow.

Self-contained (it is copied next to saved tokenizers for remote code).
"""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizer

NUM_BYTES = 256


class ByteTokenizer(PreTrainedTokenizer):
    """Tokenizer over raw UTF-8 bytes.

    Token id `b` (0 ≤ b < 256) is the byte `b`; the special tokens take the ids after the bytes, in the order
    end-of-text (256), padding (257), mask (258). Text is encoded as UTF-8, so every string is representable
    and there is no unknown token. Decoding maps ids back to bytes and decodes them as UTF-8 with
    `errors="replace"`: a byte sequence that is not valid UTF-8 (e.g. a multi-byte character cut in the middle
    while sampling) decodes to U+FFFD instead of raising.

    No special token is added by `__call__`; the data pipeline appends end-of-text after each document.

    Args:
        eos_token (`str`, defaults to `"<|endoftext|>"`): end of a document (id 256).
        pad_token (`str`, defaults to `"<pad>"`): padding (id 257).
        mask_token (`str`, defaults to `"<mask>"`): the mask of masked / diffusion models (id 258).
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<pad>",
        mask_token: str = "<mask>",
        **kwargs,
    ) -> None:
        specials = [eos_token, pad_token, mask_token]
        self._added_tokens_decoder = {
            NUM_BYTES + index: token if isinstance(token, AddedToken) else AddedToken(token, special=True)
            for index, token in enumerate(specials)
        }
        kwargs.pop("added_tokens_decoder", None)
        super().__init__(eos_token=eos_token, pad_token=pad_token, mask_token=mask_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        """The number of byte ids (the special tokens come on top: `len(tokenizer)` is the model vocabulary)."""
        return NUM_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(index): index for index in range(NUM_BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(byte) for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int | None:
        if len(token) == 1 and ord(token) < NUM_BYTES:
            return ord(token)
        return None

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                data += token.encode("utf-8")
            else:
                data.append(ord(token))
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """The vocabulary is the 256 bytes: there is no file to write."""
        return ()
