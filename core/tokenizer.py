"""Tokenizers shared by the frontend (routing) and the mocker (serving): the same ids on both sides.

Two implementations share one small interface (:class:`MockerTokenizer`):

- :class:`BuiltinTokenizer` needs no files. Text is split into GPT-2-like
  pieces; a piece that is one of ~500 common English words (optionally with a
  leading space) maps to one id, anything else falls back to one id per UTF-8
  byte. ``decode(encode(text)) == text`` for every string. Chat messages are
  rendered in a ChatML-like format with ``<|im_start|>`` / ``<|im_end|>``.
- :class:`HfTokenizer` loads ``tokenizer.json`` with the ``tokenizers``
  library and renders ``chat_template`` from ``tokenizer_config.json`` (or
  ``chat_template.jinja``) with a sandboxed jinja2 environment, like
  transformers' ``apply_chat_template``.

Both expose ``generation_ids``: vocabulary ids the simulated model samples
from. Each decodes, on its own, to non-empty text, and ``token_text[id]`` is
that text, so streamed deltas concatenate to the final text.

Importing this module is cheap: ``tokenizers`` and ``jinja2`` are imported
only when a model directory is loaded.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, Sequence

__all__ = [
    "MockerTokenizer",
    "BuiltinTokenizer",
    "HfTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "message_text",
]


class TokenizerError(Exception):
    """The model directory cannot provide a usable tokenizer or chat template."""


class MockerTokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    generation_ids: list[int]
    token_text: dict[int, str]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> list[int]: ...


def message_text(content: Any) -> str:
    """Flatten an OpenAI message ``content`` (string, parts list or null) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append(part["text"])
    return "".join(parts)


_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one
have this from or had by hot word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under
name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here
must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant
cover food sun four between state keep eye never last let thought city tree cross
farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example
ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain
stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family
direct pose leave song measure door product black short numeral class wind question
happen complete ship area half rock order fire south problem piece told knew pass
since top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center
love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure
star box noun field rest correct able pound done beauty drive stood contain front
teach week final gave green quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel
full force blue object decide surface deep moon island foot system busy test record
boat common gold possible plane stead dry wonder laugh thousand ago ran check game
shape equate miss brought heat snow tire bring yes distant fill east paint language
among model engine token cache block prefill decode router worker
user assistant system hello world quick brown fox jumps lazy
""".split()

def chatml(messages: list[dict]) -> str:
    """ChatML-like rendering of ``messages`` followed by an assistant generation prompt."""
    out = []
    for m in messages:
        out.append(f"<|im_start|>{m.get('role', 'user')}\n{message_text(m.get('content'))}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


_SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHUNK_CHARS = 1024  # BuiltinTokenizer.encode caches chunks of about this many characters
CHUNK_CACHE_SIZE = 4096
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class BuiltinTokenizer:
    """Deterministic file-free tokenizer: common words as single ids, bytes otherwise."""

    name = "builtin"

    def __init__(self) -> None:
        self.specials = list(_SPECIALS)
        self.special_ids = {s: i for i, s in enumerate(self.specials)}
        self.bos_token_id = self.special_ids["<s>"]
        self.eos_token_id = self.special_ids["</s>"]
        self.byte_offset = len(self.specials)
        word_offset = self.byte_offset + 256
        words: list[str] = []
        seen: set[str] = set()
        for w in _WORDS:
            if w not in seen:
                seen.add(w)
                words.extend((w, " " + w))
        self.words = words
        self.word_ids = {w: word_offset + i for i, w in enumerate(words)}
        self.vocab_size = word_offset + len(words)
        self._special_re = re.compile("|".join(re.escape(s) for s in self.specials))
        self.generation_ids = [self.word_ids[w] for w in words if w.startswith(" ")]
        self.token_text = {i: self.words[i - word_offset] for i in self.generation_ids}
        self._chunk_cache: OrderedDict[str, list[int]] = OrderedDict()

    def _encode_plain(self, text: str, out: list[int]) -> None:
        word_ids = self.word_ids
        off = self.byte_offset
        for piece in _PIECE.findall(text):
            tid = word_ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(off + b for b in piece.encode("utf-8"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; special-token strings map to their ids.

        Long texts are encoded in chunks of about :data:`CHUNK_CHARS` characters, cut only at a
        single space between two non-space characters. Every piece ends before such a space
        and the next one starts at it, and no special token contains a space, so the ids are
        exactly those of encoding the whole text. Chunks are cached (LRU): prompts sharing a
        long prefix (system prompts, documents, conversation history) re-encode only the
        chunks after the point where they differ.
        """
        n = len(text)
        if n <= 2 * CHUNK_CHARS:
            return self._encode_text(text)
        out: list[int] = []
        cache = self._chunk_cache
        start = 0
        while start < n:
            cut = text.find(" ", start + CHUNK_CHARS) if start + CHUNK_CHARS < n else -1
            while cut != -1 and (text[cut - 1].isspace() or cut + 1 >= n or text[cut + 1].isspace()):
                cut = text.find(" ", cut + 1)
            end = n if cut == -1 else cut
            chunk = text[start:end]
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_text(chunk)
                cache[chunk] = ids
                if len(cache) > CHUNK_CACHE_SIZE:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(chunk)
            out.extend(ids)
            start = end
        return out

    def _encode_text(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            self._encode_plain(text[pos : m.start()], out)
            out.append(self.special_ids[m.group()])
            pos = m.end()
        self._encode_plain(text[pos:], out)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        pending = bytearray()
        off = self.byte_offset
        word_off = off + 256
        for t in ids:
            if off <= t < word_off:
                pending.append(t - off)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if t < off:
                if not skip_special_tokens:
                    parts.append(self.specials[t])
            elif t < self.vocab_size:
                parts.append(self.words[t - word_off])
            else:
                raise ValueError(f"token id {t} is out of vocabulary")
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def render_chat(self, messages: list[dict]) -> str:
        return chatml(messages)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of the ChatML-like rendering of ``messages`` plus a generation prompt."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _token_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HfTokenizer:
    """A Hugging Face ``tokenizer.json`` plus the chat template of ``tokenizer_config.json``."""

    name = "hf"
    MAX_GENERATION_IDS = 8192

    def __init__(self, model_dir: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
            raise TokenizerError(f"the 'tokenizers' package is needed for --model-path: {exc}")
        d = Path(model_dir)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{d} has no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the library raises plain Exception subclasses
            raise TokenizerError(f"cannot load {tok_file}: {exc}") from None
        config: dict = {}
        cfg_file = d / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except ValueError as exc:
                raise TokenizerError(f"{cfg_file} is not valid JSON: {exc}") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{cfg_file} must hold a JSON object")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        specials = {
            i for i, t in self._tok.get_added_tokens_decoder().items() if getattr(t, "special", False)
        }
        self.eos_token_id = self._find_eos(specials)
        self._template_src = self._find_template(d, config)
        self._template = None
        self.generation_ids, self.token_text = self._pick_generation_ids(specials)
        if not self.generation_ids:
            raise TokenizerError(f"{tok_file}: no vocabulary entry decodes to plain text")

    def _find_eos(self, specials: set[int]) -> int:
        if self.eos_token is not None:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                return tid
        for cand in ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<eos>"):
            tid = self._tok.token_to_id(cand)
            if tid is not None:
                return tid
        return min(specials) if specials else 0

    @staticmethod
    def _find_template(d: Path, config: dict) -> str | None:
        tpl = config.get("chat_template")
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if isinstance(tpl, str):
            return tpl
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        return None

    def _pick_generation_ids(self, specials: set[int]) -> tuple[list[int], dict[int, str]]:
        # A token's text is measured after an anchor token so that decoders
        # which strip a leading space on the first token (Metaspace) keep it.
        decode = self._tok.decode
        anchor_id = None
        for cand in ("a", "Ġa", "▁a", "the", "Ġthe", "▁the"):
            anchor_id = self._tok.token_to_id(cand)
            if anchor_id is not None:
                break
        anchor = decode([anchor_id]) if anchor_id is not None else ""
        n = self._tok.get_vocab_size(with_added_tokens=False)
        stride = max(1, n // (self.MAX_GENERATION_IDS * 2))
        ids: list[int] = []
        text: dict[int, str] = {}
        for tid in range(0, n, stride):
            if tid in specials:
                continue
            if anchor_id is not None:
                full = decode([anchor_id, tid])
                if not full.startswith(anchor):
                    continue
                piece = full[len(anchor) :]
            else:
                piece = decode([tid])
            if not piece or "\ufffd" in piece or not any(c.isalnum() for c in piece):
                continue
            ids.append(tid)
            text[tid] = piece
            if len(ids) >= self.MAX_GENERATION_IDS:
                break
        return ids, text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict]) -> str:
        if self._template_src is None:
            # vLLM refuses chat without a template; the mocker falls back to
            # the built-in ChatML-like text so a bare tokenizer.json still works.
            return chatml(messages)
        if self._template is None:
            self._template = _compile_template(self._template_src)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
                documents=None,
            )
        except TemplateRenderError:
            raise
        except Exception as exc:
            raise TemplateRenderError(f"chat template failed: {exc}") from None

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class TemplateRenderError(ValueError):
    """The chat template rejected the messages (a client error)."""


def _compile_template(src: str):
    import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateRenderError(message)

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(src)
    except TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


def load_tokenizer(model_path: str | Path | None = None) -> MockerTokenizer:
    """The tokenizer the mocker uses: from ``model_path`` when given, else built-in."""
    if model_path is None:
        return BuiltinTokenizer()
    return HfTokenizer(model_path)
