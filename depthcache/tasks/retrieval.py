"""``retrieval``: in-context key-value lookup among distractors; the answer is in the prompt, difficulty by list length.

A prompt lists ``pairs`` distinct words with distinct three-digit numbers, then asks for one word's number:
``"Remember the number after each word.\\nowl: 417\\nriver: 932\\n...\\nNow recall.\\nriver:"`` → ``" 932"`` (the
question repeats the list's own format, so greedy decoding answers with the number). The choices are the asked number
and three other numbers of the same list, so a model that only knows which numbers were shown scores at chance. Items
are spread evenly over list lengths ``min_pairs``, 2 × min_pairs, 4 × min_pairs, ... up to ``max_pairs`` (always
included): the longer the list, the more distractors in context and the farther the answer can be from the question.
"""

from __future__ import annotations

from depthcache.errors import DepthcacheError
from depthcache.tasks.base import N_DISTRACTORS, TaskItem, item_rng, require_int, with_distractors

DESCRIPTION = ("key-value lookup among distractors, answer in the prompt ('owl: 417 ... Now recall. owl:' -> ' 417'), "
               "lists of 4, 8, 16, 32 pairs; options min_pairs=4, max_pairs=32")
DEFAULT_SEED = 0
DEFAULT_N = 200
HEADER = "Remember the number after each word."
VALUES = range(100, 1000)
KEYS = (
    "apple", "anchor", "arrow", "badge", "basket", "bell", "blanket", "boat", "bottle", "bridge", "brush", "bucket",
    "button", "cabin", "camera", "candle", "carpet", "castle", "chair", "cloud", "coin", "comet", "cookie", "copper",
    "cotton", "desert", "diamond", "dragon", "drum", "eagle", "engine", "falcon", "feather", "forest", "garden",
    "glove", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "magnet",
    "marble", "meadow", "mirror", "needle", "ocean", "orange", "owl", "paper", "pencil", "pepper", "piano", "pillow",
    "planet", "pocket", "rabbit", "ribbon", "river", "rocket", "saddle", "shadow", "silver", "spoon", "stone",
    "tiger", "tunnel", "valley", "violin", "wagon", "window", "wizard",
)


def levels(min_pairs: int, max_pairs: int) -> list[int]:
    """List lengths min_pairs, 2 × min_pairs, ... below max_pairs, then max_pairs itself."""
    found = []
    pairs = min_pairs
    while pairs < max_pairs:
        found.append(pairs)
        pairs *= 2
    return [*found, max_pairs]


def per_level(n: int, count: int) -> list[int]:
    """How many of ``n`` items each of ``count`` levels gets: as even as possible, shorter lists first."""
    return [n // count + (k < n % count) for k in range(count)]


def question(key: str) -> str:
    """The question for ``key``, without the answer."""
    return f"Now recall.\n{key}:"


def retrieval_item(item_id: str, pairs: int, seed: int) -> TaskItem:
    """One list of ``pairs`` word-number pairs and a question about one of them, all drawn from the item's own
    generator (so an item does not depend on which other items were drawn)."""
    rng = item_rng(seed, item_id)
    keys = rng.sample(KEYS, pairs)
    values = rng.sample(VALUES, pairs)
    position = rng.randrange(pairs)
    listing = "".join(f"{key}: {value}\n" for key, value in zip(keys, values))
    answer = f" {values[position]}"
    choices = with_distractors(answer, [f" {v}" for v in values], rng)
    return TaskItem(id=item_id, prompt=f"{HEADER}\n{listing}{question(keys[position])}", answer=answer,
                    choices=choices, hops=1,
                    meta={"pairs": pairs, "position": position, "key": keys[position], "question": question(
                        keys[position])})


def generate(n: int | None, seed: int, min_pairs: int = 4, max_pairs: int = 32) -> list[TaskItem]:
    """``n`` lookups spread evenly over the list lengths of ``levels(min_pairs, max_pairs)``, shorter lists first."""
    require_int("min_pairs", min_pairs, N_DISTRACTORS + 1, len(KEYS))
    require_int("max_pairs", max_pairs, N_DISTRACTORS + 1, len(KEYS))
    if max_pairs < min_pairs:
        raise DepthcacheError(f"max_pairs={max_pairs} is below min_pairs={min_pairs}: give max_pairs >= min_pairs")
    n = DEFAULT_N if n is None else n
    require_int("n", n, 1)
    lengths = levels(min_pairs, max_pairs)
    return [retrieval_item(f"retrieval-p{pairs:02d}-{i:03d}", pairs, seed)
            for pairs, count in zip(lengths, per_level(n, len(lengths))) for i in range(count)]
