"""Author LM: write the open turn's text with the ``author`` LM in Triton.

The author is a base (not instruction-tuned) LM, so the prompt is a plain
transcript: a short example conversation that sets the register, then the
request's conversation as ``<speaker label>: <text>`` lines, ending with the
open turn's ``<label>:``. Generation stops at the end of that line (the
Triton loop stops on line-break tokens). The raw line is cleaned to one
natural turn; an unusable line is retried with the next seed, a bounded
number of times.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from handler.engines.base import ParamRule, ParamValue
from handler.errors import InferenceError
from handler.triton import TritonClient

AUTHOR_MODEL = "author"
MAX_ATTEMPTS = 3
MAX_WORDS = 40
FRAME = (
    "Below are transcripts of relaxed, natural conversations between two people, "
    "speaker 0 and speaker 1. Each line is one short spoken turn.\n\n"
    "0: Hey, how was the trip?\n"
    "1: Really good, thanks. The weather held up the whole time.\n"
    "0: Lucky you. Did you get out on the water?\n"
    "1: Twice, actually. The second day was the best.\n\n"
)
_PREFIX = re.compile(r"^\s*(?:speaker\s*)?\d+\s*:\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)")


# The kalpa-converse ``params`` an authored turn takes (besides the voice's own).
AUTHOR_RULES = (
    ParamRule("temperature", "temperature", float, 0.0, 2.0, 0.7),
    ParamRule("top_k", "top_k", int, 1, 2051, 50),
    ParamRule("max_new_tokens", "max_new_tokens", int, 16, 128, 48, "tokens"),
    ParamRule("seed", "seed", int, 0, 2**63 - 1, 0),
)


@dataclass(frozen=True)
class AuthorParams:
    """Sampling parameters of one authoring request (temperature 0 = greedy).

    Defaults are those of :data:`AUTHOR_RULES`.
    """

    temperature: float
    top_k: int
    max_new_tokens: int
    seed: int

    @classmethod
    def from_values(cls, values: Mapping[str, ParamValue]) -> AuthorParams:
        """The parameters from values checked against :data:`AUTHOR_RULES`."""
        return cls(**values)  # type: ignore[arg-type]


def build_prompt(history: list[tuple[str, str]], speaker: str) -> str:
    """The transcript prompt: frame, then ``label: text`` lines, then ``speaker:``."""
    lines = [f"{label}: {' '.join(text.split())}" for label, text in history if text.strip()]
    return FRAME + "\n".join([*lines, f"{speaker}:"])


def clean_turn(raw: str) -> str | None:
    """One natural turn from a generated line, or None when nothing usable is left.

    Drops a leading speaker prefix, keeps at most :data:`MAX_WORDS` words, and
    cuts a trailing unfinished fragment after the last sentence end.
    """
    text = " ".join(_PREFIX.sub("", raw.split("\n", 1)[0]).split())
    words = text.split(" ")
    if len(words) > MAX_WORDS:
        text = " ".join(words[:MAX_WORDS])
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] < len(text):
        text = text[: ends[-1]]
    elif not ends and len(words) > MAX_WORDS:
        return None
    return text if re.search(r"[A-Za-z]", text) else None


async def author_turn(
    triton: TritonClient, history: list[tuple[str, str]], speaker: str, params: AuthorParams
) -> str:
    """Write the open turn for ``speaker`` given ``(label, text)`` history.

    Raises:
        InferenceError: no usable turn after :data:`MAX_ATTEMPTS` seeds (502), or Triton failed.
        ServiceUnavailable: Triton unreachable.
    """
    prompt = build_prompt(history, speaker)
    for attempt in range(MAX_ATTEMPTS):
        outputs = await triton.infer(
            AUTHOR_MODEL,
            {
                "PROMPT": np.array([prompt.encode("utf-8")], dtype=np.object_),
                "TEMPERATURE": np.array([params.temperature], dtype=np.float32),
                "TOP_K": np.array([params.top_k], dtype=np.int32),
                "MAX_NEW_TOKENS": np.array([params.max_new_tokens], dtype=np.int32),
                "SEED": np.array([(params.seed + attempt) % 2**63], dtype=np.int64),
            },
            ["TEXT"],
        )
        text = clean_turn(bytes(outputs["TEXT"].reshape(-1)[0]).decode("utf-8", "replace"))
        if text:
            return text
    raise InferenceError(f"the author model produced no usable turn in {MAX_ATTEMPTS} attempts")
