"""The Japanese SWE tokenizer: `SWEEncoder` over the ja-swe vocabulary, `encode` and `decode`.

Three modules:
* `gptsan.tokenization_reference`: the definition: the vocabulary and emoji file formats and
  their checks, the encoding rules and decode (`ReferenceEncoder`), bit-exact with the
  published `SWEEncoder_ja` (tanreinama/GPTSAN `encode_swe.py`);
* `gptsan.tokenization_fast`: the speed machinery (emoji scan, linear-time cleaning, decision
  tables, numpy scanner), tested equal to the definition;
* here: `SWEEncoder`, the definition with its encoding steps 2-4 run by the fast parts (10-30x
  faster, linear time), and the public names of both.
"""
from gptsan.tokenization_fast import EmojiReplacer, Scanner, clean_text
from gptsan.tokenization_reference import (  # noqa: F401 (the public names of the tokenizer)
    BYTE_TOKEN_RE, CONTROL_TOKENS, EMOJI_TOKEN_RE, NUM_BYTE_TOKENS, PROJECT_EMOJI,
    PROJECT_VOCABULARY, SPECIAL_TOKENS, ReferenceEncoder, TokenizerInputError, VocabularyError,
    check_emoji_table, check_vocabulary, read_emoji_file, read_vocabulary_file, split_entry)


class SWEEncoder(ReferenceEncoder):
    """Japanese sub-word encoder over a ja-swe vocabulary and emoji table.

    Args:
      vocab_lines: one string per token id (`open(path).read().split('\\n')`); an entry holds
        one or more comma-separated surface forms, the first is canonical.
      emoji_dict: {"emoji": {surface: "<|emojiK|>"}, "emoji_inv": {"<|emojiK|>": surface}}.
    """

    def __init__(self, vocab_lines, emoji_dict):
        super().__init__(vocab_lines, emoji_dict)
        self._emoji_replacer = EmojiReplacer(emoji_dict["emoji"])
        self._scanner = Scanner(self)

    def replace_emoji(self, text):
        return self._emoji_replacer(text)

    clean_text = staticmethod(clean_text)

    def scan(self, text):
        return self._scanner.scan(text)
