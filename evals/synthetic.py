"""RULER-style synthetic long-context tasks, generated deterministically from a seed.

Every prompt is sized in tokens of the tokenizer the model will see (special tokens included,
as ``tokenizer(prompt)`` adds them) and lands within 2 % below-or-at the requested length.
Prompts are completion-style: the answer is what naturally follows the last words, so base and
small instruct models can be scored without a chat template.

    samples = generate_samples("passkey", tokenizer, 4096, n=20, seed=0)
    score("passkey", samples[0], " 71432.")  # -> 1.0

Scores follow RULER's ``string_match_all``: the fraction of gold answers that occur
(case-insensitively) in the completion, so single-answer tasks score 0 or 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["TASKS", "DEFAULT_TASKS", "TaskSpec", "Sample", "generate_samples", "score", "count_tokens", "depths_for"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LENGTH_TOLERANCE = 0.02

# Small built-in vocabularies (keys, word-valued needles, common-words lists): real English words
# read better to a model than random strings, and shipping them keeps generation offline.
ADJECTIVES = """
ancient bitter bold brave bright broken calm careful cheerful clever cold cool crisp curious
dark deep distant dry eager early empty fancy fast fierce flat fresh friendly gentle giant
glad golden grand green happy heavy hidden hollow honest huge humble icy jolly kind large
late lazy light little lively lonely loud lucky merry mighty modern narrow nervous noble odd
old pale patient plain polite proud quick quiet rapid rare rich rough round royal rusty sad
sharp shiny short silent silver simple slow small smooth soft solid sour steady strange
strong sunny sweet swift tall tender thick thin tiny tired tough vast warm wet wide wild wise
young""".split()
NOUNS = """
anchor apple arrow badger basket beacon bell berry blanket boat bottle bridge brook bucket
button cabin camera candle canyon carpet castle cattle cedar chair cherry cloud clover coffee
comet copper coral cottage crayon crown crystal desert dolphin dragon drum eagle ember engine
falcon feather fiddle forest fountain garden garlic ginger glacier goblet harbor hammer helmet
honey island jacket jungle kettle kitten ladder lantern lemon lizard magnet maple marble meadow
mirror monkey mountain needle nest oyster paddle palace parrot pebble pencil pepper piano
pillow planet pocket pond puzzle rabbit ribbon river rocket saddle salmon school shadow shell
spider spoon squirrel statue stone sugar summer sword teapot thunder tiger timber tomato
tower trumpet tulip turtle valley violin wagon walnut whistle window winter wizard""".split()

Needles = List[Tuple[str, float]]  # (needle text, depth fraction in the haystack)


# ---------------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # requested prompt length in tokens
    seed: int
    index: int
    prompt: str
    answers: Tuple[str, ...]
    depth: Optional[float]  # depth fraction of needles[0] in the haystack; None for list tasks
    n_tokens: int  # actual prompt length in tokens
    needles: Tuple[str, ...] = ()
    max_new_tokens: int = 32
    stop: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Built:
    """One candidate prompt for a given haystack size."""

    prompt: str
    answers: Tuple[str, ...]
    needles: Tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    # make(rng, depth, haystack, **kwargs) -> build, where build(k) sizes the prompt with k units
    make: Callable[..., Callable[[int], _Built]]
    max_new_tokens: int
    stop: Tuple[str, ...]
    uses_depth: bool = True
    kwargs: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- haystack
@functools.lru_cache(maxsize=8)
def _load_text(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        # A corpus folder may carry its licence as a .txt; that is not haystack prose.
        files = sorted(f for f in p.glob("*.txt") if "license" not in f.name.lower())
        if not files:
            raise FileNotFoundError(f"haystack folder {p} holds no .txt files")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        raise FileNotFoundError(f"haystack {p} is neither a file nor a folder")
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        raise ValueError(f"haystack {p} is empty")
    return text + "\n\n"  # every unit keeps trailing whitespace, also across the wrap-around


@functools.lru_cache(maxsize=8)
def _units_of(text: str) -> Tuple[str, ...]:
    # Words with their trailing whitespace: joining units restores the text exactly, and a
    # word is a fine enough step (1-4 tokens) to hit a token budget within 2 %.
    return tuple(re.findall(r"\S+\s*", text))


class _Haystack:
    """An endless stream of text units (words), starting at a sentence start."""

    def __init__(self, haystack: Union[str, Path, None], rng: random.Random):
        if haystack is None:
            self.units = _units_of(FILLER + " ")
            self.offset = 0
        else:
            self.units = _units_of(_load_text(str(haystack)))
            self.offset = self._sentence_start(rng.randrange(len(self.units)))

    def _sentence_start(self, i: int) -> int:
        n = len(self.units)
        for step in range(n):
            j = (i + step) % n
            if j == 0 or _ends_sentence(self.units[j - 1]):
                return j
        return i

    def take(self, k: int) -> List[str]:
        n = len(self.units)
        return [self.units[(self.offset + i) % n] for i in range(k)]


def _ends_sentence(unit: str) -> bool:
    # A single newline is no boundary: many corpora hard-wrap lines mid-sentence.
    return "\n\n" in unit or unit.rstrip().endswith((".", "!", "?", '."', '?"', '!"'))


def _insert_needles(units: List[str], needles: Needles) -> str:
    """Place each needle at its depth, snapped to a nearby sentence boundary."""
    k = len(units)
    window = max(3, k // 100)  # snapping moves a needle by at most ~1 % of the haystack
    placed = sorted(((_snap(units, round(d * k), window), i, text) for i, (text, d) in enumerate(needles)))
    out, prev = [], 0
    for pos, _, text in placed:
        out.extend(units[prev:pos])
        out.append(text + " ")
        prev = pos
    out.extend(units[prev:])
    return "".join(out).strip()


def _snap(units: Sequence[str], p: int, window: int) -> int:
    k = len(units)
    for delta in sorted(range(-window, window + 1), key=abs):
        q = p + delta
        if 0 <= q <= k and (q == 0 or q == k or _ends_sentence(units[q - 1])):
            return q
    return min(max(p, 0), k)


def _haystack_task(prefix: str, suffix: str, needles: Needles, answers: Sequence[str], hay: _Haystack):
    def build(k: int) -> _Built:
        body = _insert_needles(hay.take(k), needles)
        return _Built(prefix + body + suffix, tuple(answers), tuple(t for t, _ in needles))

    return build


# ---------------------------------------------------------------------------------- values
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct(rng: random.Random, make: Callable[[random.Random], str], n: int, avoid: str = "") -> List[str]:
    """n different values, none contained in `avoid` (a value inside its key, e.g. word value
    "river" for key "calm-river", would be answerable by echoing the question)."""
    seen: List[str] = []
    while len(seen) < n:
        v = make(rng)
        if v not in seen and v not in avoid:
            seen.append(v)
    return seen


_VALUE_KINDS = {
    "number": ("number", "numbers", lambda rng: _number(rng, 7)),
    "word": ("word", "words", lambda rng: rng.choice(NOUNS + ADJECTIVES)),
    "uuid": ("uuid", "uuids", _uuid),
}


def _value_kind(value_kind: str):
    if value_kind not in _VALUE_KINDS:
        raise ValueError(f"value_kind={value_kind!r}; expected one of {sorted(_VALUE_KINDS)}")
    return _VALUE_KINDS[value_kind]


def _spread(depth: float, n: int) -> List[float]:
    """n depths evenly spaced around the haystack, the first at `depth`."""
    return [(depth + i / n) % 1.0 if i else depth for i in range(n)]


# ---------------------------------------------------------------------------------- tasks
def _passkey(rng, depth, hay, digits: int = 5):
    key = _number(rng, digits)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prefix = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about the important information there.\n\n"
    )
    return _haystack_task(prefix, "\n\nWhat is the pass key? The pass key is", [(needle, depth)], [key], hay)


def _niah_prefix(plural: str) -> str:
    return (
        f"Some special magic {plural} are hidden within the following text. Make sure to memorize "
        f"them. I will quiz you about the {plural} afterwards.\n\n"
    )


def _niah_question(kind: str, key: str) -> str:
    return (
        f"\n\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
        f"The special magic {kind} for {key} mentioned in the provided text is"
    )


def _niah_single(rng, depth, hay, value_kind: str = "number"):
    kind, plural, make = _value_kind(value_kind)
    key = _key(rng)
    (value,) = _distinct(rng, make, 1, avoid=key)
    needle = f"One of the special magic {plural} for {key} is: {value}."
    return _haystack_task(_niah_prefix(plural), _niah_question(kind, key), [(needle, depth)], [value], hay)


def _niah_multikey(rng, depth, hay, value_kind: str = "number", num_keys: int = 4):
    # The queried needle sits at `depth`; the distractors (other keys) are spread around it.
    kind, plural, make = _value_kind(value_kind)
    keys = _distinct(rng, _key, num_keys)
    values = _distinct(rng, make, num_keys, avoid=" ".join(keys))
    needles = [(f"One of the special magic {plural} for {k} is: {v}.", d)
               for k, v, d in zip(keys, values, _spread(depth, num_keys))]
    return _haystack_task(_niah_prefix(plural), _niah_question(kind, keys[0]), needles, [values[0]], hay)


def _niah_multivalue(rng, depth, hay, value_kind: str = "number", num_values: int = 4):
    kind, plural, make = _value_kind(value_kind)
    key = _key(rng)
    values = _distinct(rng, make, num_values, avoid=key)
    needles = [(f"One of the special magic {plural} for {key} is: {v}.", d)
               for v, d in zip(values, _spread(depth, num_values))]
    suffix = (
        f"\n\nWhat are all the special magic {plural} for {key} mentioned in the provided text? "
        f"The special magic {plural} for {key} mentioned in the provided text are"
    )
    return _haystack_task(_niah_prefix(plural), suffix, needles, values, hay)


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _variable_tracking(rng, depth, hay, num_chains: int = 1, num_hops: int = 4):
    # Chain 0 is queried; its first assignment sits at `depth` and the hops follow at even
    # spacing, wrapping to the haystack start past the end (as RULER, order is not guaranteed).
    names = _distinct(rng, _var_name, num_chains * (num_hops + 1))
    values = _distinct(rng, lambda r: _number(r, 5), num_chains)
    needles: Needles = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        depths = _spread(depth if c == 0 else rng.random(), num_hops + 1)
        statements = [f"VAR {chain[0]} = {values[c]}."] + [
            f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))
        ]
        needles += list(zip(statements, depths))
    query = names[: num_hops + 1]
    prefix = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    suffix = (
        f"\n\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(query)} "
        f"variables are assigned the value {values[0]}, they are:"
    )
    return _haystack_task(prefix, suffix, needles, query, hay)


def _kv_retrieval(rng, depth, hay):
    """A JSON object of uuid -> uuid pairs is the whole context (no prose haystack).

    `k` counts characters of uuid material: k // 72 full pairs, then one pair of truncated
    uuids takes up the remainder, which lets the prompt length move in steps of ~1 token.
    """
    pair_chars = 72  # two 36-character uuids
    pool: List[str] = []

    def uuid_at(i: int) -> str:
        while len(pool) <= i:
            pool.append(_uuid(rng))
        return pool[i]

    def build(k: int) -> _Built:
        full, rest = max(k // pair_chars, 1), k % pair_chars if k >= pair_chars else 0
        pairs = [(uuid_at(2 * i), uuid_at(2 * i + 1)) for i in range(full)]
        if rest >= 2:
            pairs.append((uuid_at(2 * full)[: rest // 2], uuid_at(2 * full + 1)[: rest - rest // 2]))
        q = min(round(depth * (full - 1)), full - 1)
        key, value = pairs[q]
        body = ", ".join(f'"{a}": "{b}"' for a, b in pairs)
        prompt = (
            "Extract the value corresponding to the specified key in the JSON object below.\n\n"
            f"JSON data:\n{{{body}}}\n\nKey: \"{key}\"\nThe value associated with the specified key is:"
        )
        return _Built(prompt, (value,), (f'"{key}": "{value}"',))

    return build


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def _common_words(rng, depth, hay, num_common: int = 10, freq_common: int = 30, freq_rare: int = 3,
                  capacity: int = 0):
    """A numbered list where `num_common` words recur; `k` counts the rare-word entries.

    The common words' frequency is capped so they fill at most a third of the list (`capacity`:
    entries that fit the length, measured by the caller), leaving short prompts room for rare
    words; rare words always recur less often than common ones.
    """
    freq_common = max(2, min(freq_common, capacity // (3 * num_common) if capacity else freq_common))
    freq_rare = max(1, min(freq_rare, freq_common - 1))
    real = list(dict.fromkeys(NOUNS + ADJECTIVES))
    rng.shuffle(real)
    common = real[:num_common]
    rare_pool = real[num_common:]
    seen = set(real)

    def rare(i: int) -> str:
        while len(rare_pool) <= i:
            w = _pseudo_word(rng)
            if w not in seen:
                seen.add(w)
                rare_pool.append(w)
        return rare_pool[i]

    order_seed = rng.random()

    def build(k: int) -> _Built:
        words = common * freq_common + [rare(i // freq_rare) for i in range(k)]
        random.Random(order_seed).shuffle(words)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        prompt = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            f"Memorize the ones that appear most often.\n{body}\nQuestion: What are the {num_common} most "
            f"common words in the above list? Answer: The top {num_common} words that appear most often "
            "in the list are:"
        )
        return _Built(prompt, tuple(common))

    return build


TASKS: Dict[str, TaskSpec] = {
    "passkey": TaskSpec(_passkey, max_new_tokens=12, stop=("\n",)),
    "niah_single": TaskSpec(_niah_single, max_new_tokens=24, stop=("\n",)),
    "niah_multikey": TaskSpec(_niah_multikey, max_new_tokens=24, stop=("\n",)),
    "niah_multivalue": TaskSpec(_niah_multivalue, max_new_tokens=80, stop=("\n\n",)),
    "kv_retrieval": TaskSpec(_kv_retrieval, max_new_tokens=48, stop=("\n",)),
    "variable_tracking": TaskSpec(_variable_tracking, max_new_tokens=40, stop=("\n\n",)),
    "common_words": TaskSpec(_common_words, max_new_tokens=96, stop=("\n\n",), uses_depth=False),
    # RULER's value-type variants, addressable by name (CLI task lists, lm-eval task names).
    "niah_single_word": TaskSpec(_niah_single, max_new_tokens=24, stop=("\n",), kwargs={"value_kind": "word"}),
    "niah_single_uuid": TaskSpec(_niah_single, max_new_tokens=48, stop=("\n",), kwargs={"value_kind": "uuid"}),
    "niah_multikey_uuid": TaskSpec(_niah_multikey, max_new_tokens=48, stop=("\n",), kwargs={"value_kind": "uuid"}),
}
DEFAULT_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_retrieval",
                 "variable_tracking", "common_words")


# ---------------------------------------------------------------------------------- sizing
def count_tokens(tokenizer, text: str) -> int:
    """Tokens the model sees for `text`, special tokens (BOS) included."""
    return len(tokenizer(text, verbose=False)["input_ids"])


def _fit(build: Callable[[int], _Built], tokenizer, target: int, k0: int = 256) -> Tuple[_Built, int]:
    """The largest haystack size k whose prompt still fits in `target` tokens.

    Token count grows about linearly with k (words, list entries or characters, by task), so
    secant steps from a probe at k0 land within a few tokenizations; a bracket [lo, hi) keeps
    the search from oscillating.
    """
    tol = max(2, target // 400)
    cache: Dict[int, Tuple[_Built, int]] = {}

    def measure(k: int) -> int:
        if k not in cache:
            b = build(k)
            cache[k] = (b, count_tokens(tokenizer, b.prompt))
        return cache[k][1]

    base, lo, hi, k = measure(0), 0, None, max(k0, 1)
    for _ in range(40):
        n = measure(k)
        if n <= target:
            lo = max(lo, k)
            if n >= target - tol:
                break
        else:
            hi = k if hi is None else min(hi, k)
        if hi is not None and hi - lo <= 1:
            break
        per_unit = max((n - base) / k, 1e-3)
        k = max(k + round((target - n) / per_unit), lo + 1)
        if hi is not None:
            k = min(k, hi - 1)
    # Prefer not to exceed the target (it is often the context size), unless only the next
    # step up lands within the tolerance (coarse units, e.g. list entries with a tiny vocabulary).
    best = lo
    if not target * (1 - LENGTH_TOLERANCE) <= measure(lo) <= target:
        best = min(cache, key=lambda kk: abs(cache[kk][1] - target))
    return cache[best]


def depths_for(n: int) -> List[float]:
    """Needle depths spread evenly from the start (0.0) to the end (1.0) of the haystack."""
    return [i / (n - 1) for i in range(n)] if n > 1 else [0.5]


def _sample_rng(task: str, length: int, seed: int, index: int, kwargs: Mapping) -> random.Random:
    # str seeds hash through SHA-512, so the stream is identical across runs and platforms.
    return random.Random(f"{task}|{length}|{seed}|{index}|{json.dumps(dict(kwargs), sort_keys=True)}")


def generate_samples(task: str, tokenizer, length: int, n: int, seed: int = 0,
                     haystack: Union[str, Path, None] = None, **task_kwargs) -> List[Sample]:
    """`n` samples of `task` at `length` tokens; same arguments -> identical samples.

    haystack: a .txt file or a folder of .txt files; None uses the built-in filler sentences.
    task_kwargs: per-task options, e.g. value_kind="uuid" for the niah tasks, num_keys=4,
    num_values=4, num_chains=1 / num_hops=4 (variable_tracking), num_common=10 (common_words).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    spec = TASKS[task]
    kwargs = {**spec.kwargs, **task_kwargs}
    return [
        _one_sample(task, spec, tokenizer, length, seed, i, d, haystack, kwargs)
        for i, d in enumerate(depths_for(n))
    ]


def _one_sample(task, spec, tokenizer, length, seed, index, depth, haystack, kwargs) -> Sample:
    rng = _sample_rng(task, length, seed, index, {**kwargs, "haystack": str(haystack)})
    hay = _Haystack(haystack, rng)
    if task == "common_words":
        kwargs = {**kwargs, "capacity": _common_words_capacity(tokenizer, length)}
    build = spec.make(rng, depth, hay, **kwargs)
    built, n_tokens = _fit(build, tokenizer, length)
    if abs(n_tokens - length) > LENGTH_TOLERANCE * length:
        raise ValueError(
            f"{task}: cannot size a prompt to {length} tokens (best {n_tokens}); "
            "the fixed instructions may be longer than the requested length"
        )
    return Sample(
        task=task, length=length, seed=seed, index=index, prompt=built.prompt,
        answers=built.answers, depth=depth if spec.uses_depth else None, n_tokens=n_tokens,
        needles=built.needles, max_new_tokens=spec.max_new_tokens, stop=spec.stop,
    )


def _common_words_capacity(tokenizer, length: int) -> int:
    entries = " ".join(f"{i + 100}. {w}" for i, w in enumerate(NOUNS[:100]))
    return int(length / (count_tokens(tokenizer, entries) / 100))


# ---------------------------------------------------------------------------------- scoring
def score(task: str, sample: Union[Sample, Mapping], completion: str) -> float:
    """Fraction of gold answers found in `completion` (case-insensitive substring, as RULER)."""
    answers = sample.answers if isinstance(sample, Sample) else sample["answers"]
    text = truncate_at_stop(completion, sample.stop if isinstance(sample, Sample) else sample.get("stop", ()))
    text = text.lower()
    return sum(a.lower() in text for a in answers) / len(answers) if answers else 0.0


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut a completion at the first stop sequence (the prompt's answer is a single line or list)."""
    # A leading stop (the model opened with a newline) would empty the answer: skip leading space.
    stripped = text.lstrip()
    cut = min((stripped.find(s) for s in stop if s and s in stripped), default=-1)
    return stripped if cut < 0 else stripped[:cut]
