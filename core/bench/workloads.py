"""What the benchmark sends: sessions of one or more turns, built from a workload.

A *session* is what one simulated user does: one request for most workloads, several
turns for multi-turn conversations. Sessions are produced lazily (a trace can hold
thousands of long prompts) and deterministically from a seed.

Prompt text is made of words that the tokenizer encodes as exactly one token each, so a
prompt of ``n`` words is ``n`` tokens; the count is then checked with the tokenizer and
adjusted. Without a tokenizer the words are common English words and lengths are
approximate (the report then relies on the server's ``usage`` counts).
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from dynamo.core.errors import UsageError

__all__ = [
    "BenchTokenizer",
    "Turn",
    "Session",
    "TextMaker",
    "SyntheticWorkload",
    "SharedPrefixWorkload",
    "MultiTurnWorkload",
    "ShareGPTWorkload",
    "TraceWorkload",
    "load_tokenizer",
    "sample_length",
]


@dataclass
class Turn:
    """One request's content: the new user text and how many tokens to ask for."""

    prompt: str
    output_tokens: int
    input_tokens: int | None = None  # client-side count of ``prompt``; None when unknown


@dataclass
class Session:
    """One simulated user: turns sent one after the other (a single turn for most workloads)."""

    id: int
    turns: list[Turn]
    timestamp: float | None = None  # seconds after the start (trace replay only)
    group: int | None = None  # shared-prefix group or trace's first hash id


class BenchTokenizer:
    """A ``tokenizers`` tokenizer used to size prompts and recount outputs on the client."""

    def __init__(self, tokenizer, source: str):
        self._tok = tokenizer
        self.source = source

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def single_token_words(self, limit: int = 4000) -> list[str]:
        """Words (with a leading space) that this tokenizer encodes as one token."""
        vocab = self._tok.get_vocab(with_added_tokens=False)
        out: list[str] = []
        for tid in sorted(vocab.values()):
            text = self._tok.decode([tid], skip_special_tokens=True)
            word = text.strip()
            if not (2 <= len(word) <= 12 and _ALPHA.match(word)):
                continue
            candidate = " " + word
            if len(self._tok.encode(candidate, add_special_tokens=False).ids) == 1:
                out.append(candidate)
                if len(out) >= limit:
                    break
        return sorted(set(out))


_ALPHA = re.compile(r"^[a-z]+$")


def load_tokenizer(spec: str | None) -> BenchTokenizer | None:
    """Load a tokenizer from a directory or file holding ``tokenizer.json``, or a hub id."""
    if not spec:
        return None
    from tokenizers import Tokenizer

    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return BenchTokenizer(Tokenizer.from_file(str(path)), str(path))
        except Exception as exc:  # tokenizers raises plain Exception
            raise UsageError(f"cannot load tokenizer {path}: {exc}") from None
    if Path(spec).expanduser().exists():
        raise UsageError(f"--tokenizer {spec}: no tokenizer.json there")
    try:
        return BenchTokenizer(Tokenizer.from_pretrained(spec), spec)
    except Exception as exc:
        raise UsageError(f"--tokenizer {spec}: not a local tokenizer.json and not downloadable ({exc})") from None


# Used when there is no tokenizer: common words that most BPE vocabularies hold as one token.
_FALLBACK_WORDS = """
time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education foot boy age policy process music market sense nation plan college interest
death experience effect use class control care field development role effort rate heart
drug show leader light voice wife police mind price report decision son view relationship
town road arm difference value building action model season society tax director position
player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data
picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair
window evidence population site river summer board green blue red black white small large
""".split()


def sample_length(rng: random.Random, mean: float, std: float, minimum: int = 1) -> int:
    """A length from a normal distribution, rounded and clipped at ``minimum``."""
    if std <= 0:
        return max(minimum, int(round(mean)))
    return max(minimum, int(round(rng.gauss(mean, std))))


class TextMaker:
    """Makes text of a given token count from single-token words."""

    def __init__(self, tokenizer: BenchTokenizer | None):
        self.tokenizer = tokenizer
        words = tokenizer.single_token_words() if tokenizer else []
        if tokenizer is not None and len(words) < 50:
            raise UsageError(
                f"tokenizer {tokenizer.source} has too few single-token words ({len(words)}) to build prompts"
            )
        self.words = words or [" " + w for w in dict.fromkeys(_FALLBACK_WORDS)]
        # Tokens per word; without a tokenizer it is measured on the server (see calibrate).
        self.tokens_per_word = 1.0

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def word_count(self, tokens: int) -> int:
        """How many words make about ``tokens`` tokens."""
        if tokens <= 0:
            return 0
        return max(1, int(round(tokens / self.tokens_per_word)))

    def words_text(self, n: int, rng: random.Random) -> str:
        """About ``n`` tokens of words (exactly ``n`` words when each word is one token)."""
        return "".join(rng.choices(self.words, k=self.word_count(n))) if n > 0 else ""

    def calibration_texts(self, words: int = 200) -> tuple[str, str]:
        """Two texts, ``words`` and ``2 * words`` words long, to measure tokens per word on the server."""
        rng = random.Random(12345)
        short = "".join(rng.choices(self.words, k=words))
        return short, short + "".join(rng.choices(self.words, k=words))

    def text(self, n: int, rng: random.Random) -> tuple[str, int | None]:
        """Text of ``n`` tokens and its measured count (None without a tokenizer)."""
        text = self.words_text(n, rng)
        if self.tokenizer is None:
            return text, None
        return self.fit(text, n, rng)

    def fit(self, text: str, n: int, rng: random.Random) -> tuple[str, int]:
        """Trim or extend ``text`` until the tokenizer counts ``n`` tokens (a few tries)."""
        assert self.tokenizer is not None
        count = self.tokenizer.count(text)
        for _ in range(8):
            if count == n:
                break
            if count > n:
                ids = self.tokenizer._tok.encode(text, add_special_tokens=False).ids[:n]
                text = self.tokenizer._tok.decode(ids)
            else:
                text += self.words_text(n - count, rng)
            count = self.tokenizer.count(text)
        return text, count


class SyntheticWorkload:
    """Random prompts with normally distributed input and output lengths (in tokens)."""

    name = "synthetic"

    def __init__(self, maker: TextMaker, input_len: int, output_len: int, input_std: float = 0,
                 output_std: float = 0, seed: int = 0):
        self.maker, self.input_len, self.output_len = maker, input_len, output_len
        self.input_std, self.output_std, self.seed = input_std, output_std, seed

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(self.seed)
        i = 0
        while True:
            n_in = sample_length(rng, self.input_len, self.input_std)
            n_out = sample_length(rng, self.output_len, self.output_std)
            text, count = self.maker.text(n_in, rng)
            yield Session(i, [Turn(text, n_out, count)])
            i += 1

    def describe(self) -> dict:
        return {"workload": self.name, "input_len": self.input_len, "input_len_std": self.input_std,
                "output_len": self.output_len, "output_len_std": self.output_std}


class SharedPrefixWorkload:
    """Groups of prompts sharing a prefix (a system prompt), in a shuffled order.

    Each prompt is the group's shared prefix followed by a question of ``input_len``
    tokens, generated fresh for every request. The groups come in a seeded random order
    of ``groups * prompts_per_group`` slots; that order repeats, the questions do not.
    """

    name = "shared-prefix"

    def __init__(self, maker: TextMaker, groups: int, prompts_per_group: int, prefix_len: int,
                 input_len: int, output_len: int, input_std: float = 0, output_std: float = 0, seed: int = 0):
        self.maker, self.groups, self.per_group, self.prefix_len = maker, groups, prompts_per_group, prefix_len
        self.input_len, self.output_len, self.input_std, self.output_std = input_len, output_len, input_std, output_std
        self.seed = seed

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(self.seed)
        prefixes = [self.maker.text(self.prefix_len, rng)[0] for _ in range(self.groups)]
        order = [(g, k) for g in range(self.groups) for k in range(self.per_group)]
        rng.shuffle(order)
        i = 0
        while True:
            for g, _ in order:
                n_in = sample_length(rng, self.input_len, self.input_std)
                n_out = sample_length(rng, self.output_len, self.output_std)
                text = prefixes[g] + self.maker.words_text(n_in, rng)
                count = None
                if self.maker.exact:
                    text, count = self.maker.fit(text, self.prefix_len + n_in, rng)
                yield Session(i, [Turn(text, n_out, count)], group=g)
                i += 1

    def describe(self) -> dict:
        return {"workload": self.name, "groups": self.groups, "prompts_per_group": self.per_group,
                "shared_prefix_len": self.prefix_len, "input_len": self.input_len, "output_len": self.output_len}


class MultiTurnWorkload:
    """Conversations of ``turns`` user messages; each turn carries the whole history.

    The next turn is sent when the previous reply has arrived (plus ``turn_delay``
    seconds of user think time), with the reply's text in the history.
    """

    name = "multi-turn"

    def __init__(self, maker: TextMaker, turns: int, input_len: int, output_len: int,
                 input_std: float = 0, output_std: float = 0, turn_delay: float = 0.0, seed: int = 0):
        self.maker, self.turns, self.input_len, self.output_len = maker, turns, input_len, output_len
        self.input_std, self.output_std, self.turn_delay, self.seed = input_std, output_std, turn_delay, seed

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(self.seed)
        i = 0
        while True:
            turns = []
            for _ in range(self.turns):
                n_in = sample_length(rng, self.input_len, self.input_std)
                n_out = sample_length(rng, self.output_len, self.output_std)
                text, count = self.maker.text(n_in, rng)
                turns.append(Turn(text, n_out, count))
            yield Session(i, turns)
            i += 1

    def describe(self) -> dict:
        return {"workload": self.name, "turns": self.turns, "input_len": self.input_len,
                "output_len": self.output_len, "turn_delay_s": self.turn_delay}


class ShareGPTWorkload:
    """First user turn of each ShareGPT conversation; the reference reply sets the output length.

    Like ``vllm bench serve``: pairs whose prompt or reply is under 4 tokens, whose prompt is
    over 1024 tokens or whose total is over 2048 tokens are skipped. ``output_len`` (when
    given) replaces the reply's length. Lengths are counted with the tokenizer, else estimated
    at 1.3 tokens per word. Conversations are shuffled with the seed and cycled.
    """

    name = "sharegpt"

    def __init__(self, path: Path, tokenizer: BenchTokenizer | None, output_len: int | None = None, seed: int = 0):
        self.path, self.output_len, self.seed = path, output_len, seed
        self.pairs = self._load(path, tokenizer, output_len)

    @staticmethod
    def _load(path: Path, tokenizer: BenchTokenizer | None, output_len: int | None) -> list[Turn]:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read dataset {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"dataset {path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise UsageError(f"dataset {path}: expected a JSON list of ShareGPT conversations")
        raw: list[tuple[str, str]] = []
        for item in data:
            if not isinstance(item, dict):
                continue
            conv = item.get("conversations") or item.get("conversation") or item.get("messages") or []
            msgs = [m for m in conv if isinstance(m, dict)]
            texts = [(str(m.get("from", m.get("role", ""))), m.get("value", m.get("content"))) for m in msgs]
            for (role_a, a), (role_b, b) in zip(texts, texts[1:]):
                if role_a in ("human", "user") and role_b in ("gpt", "assistant", "chatgpt", "bing", "bard") \
                        and isinstance(a, str) and isinstance(b, str):
                    raw.append((a, b))
                    break
        if not raw:
            raise UsageError(f"dataset {path}: no conversation starts with a user turn followed by a reply")
        if tokenizer is not None:
            in_counts = tokenizer.count_batch([a for a, _ in raw])
            out_counts = tokenizer.count_batch([b for _, b in raw])
        else:  # about 1.3 tokens per word in English BPE vocabularies
            in_counts = [max(1, round(len(a.split()) * 1.3)) for a, _ in raw]
            out_counts = [max(1, round(len(b.split()) * 1.3)) for _, b in raw]
        pairs = []
        for (a, _), n_in, n_out in zip(raw, in_counts, out_counts):
            if output_len is not None:
                n_out = output_len
            if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
                continue
            pairs.append(Turn(a, n_out, n_in if tokenizer is not None else None))
        if not pairs:
            raise UsageError(f"dataset {path}: every conversation was filtered out (length limits)")
        return pairs

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(self.seed)
        order = list(range(len(self.pairs)))
        rng.shuffle(order)
        i = 0
        while True:
            for k in order:
                t = self.pairs[k]
                yield Session(i, [Turn(t.prompt, t.output_tokens, t.input_tokens)])
                i += 1

    def describe(self) -> dict:
        return {"workload": self.name, "dataset": str(self.path), "conversations": len(self.pairs),
                "output_len": self.output_len}


@dataclass
class TraceEntry:
    timestamp: float  # seconds
    input_length: int
    output_length: int
    hash_ids: list[int] = field(default_factory=list)


class TraceWorkload:
    """Mooncake trace replay: JSONL of ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``.

    Each hash id stands for one block of ``block_size`` tokens whose text is derived from
    the id, so requests sharing hash ids share a prompt prefix exactly as in the trace.
    Requests are sent at their timestamps divided by ``speedup`` (unless a concurrency is
    given, which ignores the timestamps).
    """

    name = "trace"

    def __init__(self, path: Path, maker: TextMaker, block_size: int = 512, speedup: float = 1.0):
        if block_size < 1:
            raise UsageError("--trace-block-size must be at least 1")
        if speedup <= 0:
            raise UsageError("--trace-speedup must be greater than 0")
        self.path, self.maker, self.block_size, self.speedup = path, maker, block_size, speedup
        self.entries = self._load(path)
        self._block = functools.lru_cache(maxsize=8192)(self._block_text)

    @staticmethod
    def _load(path: Path) -> list[TraceEntry]:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read trace {path}: {exc.strerror}") from None
        entries = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                entries.append(TraceEntry(
                    float(obj.get("timestamp", 0)) / 1000.0,
                    int(obj["input_length"]),
                    int(obj["output_length"]),
                    [int(h) for h in obj.get("hash_ids", [])],
                ))
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{path}:{n}: not a mooncake trace line "
                                 f"(timestamp, input_length, output_length, hash_ids): {exc}") from None
        if not entries:
            raise UsageError(f"trace {path} is empty")
        entries.sort(key=lambda e: e.timestamp)
        return entries

    def _block_text(self, hash_id: int) -> str:
        return self.maker.words_text(self.block_size, random.Random(f"block-{hash_id}"))

    def prompt(self, entry: TraceEntry, rng: random.Random) -> tuple[str, int | None]:
        parts: list[str] = []
        remaining = entry.input_length
        for hid in entry.hash_ids:
            if remaining <= 0:
                break
            take = min(self.block_size, remaining)
            block = self._block(hid)
            if take < self.block_size:
                block = "".join(_split_words(block)[: self.maker.word_count(take)])
            parts.append(block)
            remaining -= take
        if remaining > 0:
            parts.append(self.maker.words_text(remaining, rng))
        text = "".join(parts)
        if self.maker.exact:
            return self.maker.fit(text, entry.input_length, rng)
        return text, None

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(0)
        t0 = self.entries[0].timestamp
        for i, e in enumerate(self.entries):
            text, count = self.prompt(e, rng)
            yield Session(i, [Turn(text, max(1, e.output_length), count)],
                          timestamp=(e.timestamp - t0) / self.speedup,
                          group=e.hash_ids[0] if e.hash_ids else None)

    def describe(self) -> dict:
        return {"workload": self.name, "trace": str(self.path), "requests": len(self.entries),
                "block_size": self.block_size, "speedup": self.speedup}


_WORD = re.compile(r" [^ ]+")


def _split_words(text: str) -> list[str]:
    return _WORD.findall(text)
