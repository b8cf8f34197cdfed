"""The tiny task's tokenizer: characters, plus whole tokens for the style openers and `\\boxed{`.

Built (deterministically, no training corpus needed) with the `tokenizers` library: a BPE model
without merges over printable ASCII is a character-level tokenizer; "Sum:", "Guess:" and
"\\boxed{" are added tokens, so each style opens with ONE distinct token id (what KTAE scores).
Digits are single characters, which is what lets a tiny model learn carries.

Why byte-level with Qwen2's pre-tokenizer: transformers 5's `AutoTokenizer` ignores the saved
`tokenizer_class` for `model_type: qwen2` and rebuilds the pipeline as `Qwen2Tokenizer` does
(NFC, Qwen2's split regex, byte-level mapping, BPE from the saved vocab and merges). Building ours
the same way, with the vocabulary in byte-level form (space is "\u0120", newline "\u010a"), makes
both loaders encode and decode identically. Characters outside the vocabulary are dropped, as
Qwen2Tokenizer would drop them.

Wrapped as a `PreTrainedTokenizerFast` with a chat template, so `AutoTokenizer.from_pretrained`
loads a saved folder offline:

    <|system|>...<|end|><|user|>What is 1+2?<|end|><|assistant|>Sum: 1+2=3. \\boxed{3}<|end|>

`<|end|>` is the EOS (it ends every supervised target), `<|pad|>` (id 0) pads.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ktae_jax.tiny.task import BOX_OPEN, RELIABLE_OPENER, SHORTCUT_OPENER

PAD, EOS, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, UNK, *ROLE_TOKENS)
WORD_TOKENS = (RELIABLE_OPENER, SHORTCUT_OPENER, BOX_OPEN)
# Printable ASCII plus newline; order fixed so ids never move.
CHARACTERS = tuple(dict.fromkeys(string.digits + string.ascii_letters + string.punctuation + " \n"))
# The byte-level alphabet writes printable ASCII as itself; these two bytes get stand-ins.
_BYTE_LEVEL = {" ": "\u0120", "\n": "\u010a"}
# Qwen2's pre-tokenizer split (a fact of its format, needed to match its loader).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown chat role ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def build_tokenizer():
    """A fresh `PreTrainedTokenizerFast` (same ids every time: specials, characters, then words)."""
    from transformers import PreTrainedTokenizerFast

    chars = tuple(_BYTE_LEVEL.get(c, c) for c in CHARACTERS)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], continuing_subword_prefix="", end_of_word_suffix=""))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=CHAT_TEMPLATE, model_max_length=512, padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def prompt_text(tokenizer, problem: str, system: str | None = None) -> str:
    """The chat-formatted prompt the trainer will also build (generation prompt included)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
