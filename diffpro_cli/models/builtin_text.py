"""The tiny word-level text encoder of builtin:flow-mnist ("builtin-words").

A prompt is lower-cased and split into words; each word maps to one token of a fixed vocabulary:
the ten digits (the word and the numeral share a token: "seven" and "7" are the same class token),
a few filler words ("a", "handwritten", "digit", ...), an unknown token for any other word, and
padding up to MAX_TOKENS. A learned token table plus a learned position table give
`encoder_hidden_states` [N, MAX_TOKENS, DIM]; `pooled_projections` [N, DIM] is the mean over the
prompt's real (non-padding) tokens (zeros for the empty prompt). The tables are trained jointly
with the transformer (diffpro_cli/train_flow.py) and shipped in the same safetensors file under
the `text_encoder.` prefix; they stay in float (no plan quantizes them).

The empty prompt is the unconditional input of classifier-free guidance (10% of training prompts).
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import torch
from torch import nn

from diffpro_cli.errors import InputError

NAME = "builtin-words"
MAX_TOKENS = 8
DIM = 64
PREFIX = "text_encoder."
WEIGHTS = Path(__file__).parent / "weights" / "flow-mnist.safetensors"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER_WORDS = ("a", "an", "the", "of", "handwritten", "digit", "number", "numeral", "image", "picture", "drawing", "written")
PAD, UNK = 0, 1
FIRST_DIGIT = 2                                   # token of digit d: FIRST_DIGIT + d
VOCAB: dict[str, int] = {}
for _d, _w in enumerate(DIGIT_WORDS):
    VOCAB[_w] = VOCAB[str(_d)] = FIRST_DIGIT + _d
for _i, _w in enumerate(FILLER_WORDS):
    VOCAB[_w] = FIRST_DIGIT + 10 + _i
VOCAB_SIZE = FIRST_DIGIT + 10 + len(FILLER_WORDS)

# training / calibration prompt templates; {} is a digit word or numeral
TEMPLATES = ("a handwritten {}", "the digit {}", "{}", "a handwritten digit {}", "the number {}",
             "an image of the digit {}", "handwritten {}", "a picture of a handwritten {}", "digit {}", "a drawing of the number {}")


def tokenize(prompt: str) -> list[int]:
    """Token ids of one prompt, padded (or cut) to MAX_TOKENS."""
    ids = [VOCAB.get(w, UNK) for w in re.findall(r"[a-z0-9]+", prompt.lower())][:MAX_TOKENS]
    return ids + [PAD] * (MAX_TOKENS - len(ids))


def token_ids(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([tokenize(p) for p in prompts], dtype=torch.long).view(len(prompts), MAX_TOKENS)


class WordEncoder(nn.Module):
    """Token table + position table; see the module docstring."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, dim)
        self.position_embedding = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding, std=0.1)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.token_embedding(ids) + self.position_embedding
        real = (ids != PAD).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * real).sum(1) / real.sum(1).clamp_min(1.0)
        return hidden, pooled


def prompt_for(digit: int, rng: random.Random) -> str:
    """A random template filled with the digit's word or numeral (rng: a seeded random.Random)."""
    word = DIGIT_WORDS[digit] if rng.random() < 0.5 else str(digit)
    return rng.choice(TEMPLATES).format(word)


def shipped_encoder() -> WordEncoder:
    """The trained encoder from the shipped weights (eval mode, no gradients; cached while the file is unchanged)."""
    if not WEIGHTS.exists():
        raise InputError(f"{WEIGHTS}: builtin:flow-mnist weights are not installed; train them with `diffpro train flow-mnist --install`")
    return _encoder_from(str(WEIGHTS), WEIGHTS.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _encoder_from(path: str, mtime_ns: int) -> WordEncoder:
    from safetensors.torch import load_file

    state = {k[len(PREFIX):]: v.float() for k, v in load_file(path).items() if k.startswith(PREFIX)}
    enc = WordEncoder()
    enc.load_state_dict(state)
    return enc.eval().requires_grad_(False)


def encode_prompts(prompts: list[str], encoder: WordEncoder | None = None) -> dict[str, torch.Tensor]:
    """{"encoder_hidden_states": [N, MAX_TOKENS, DIM], "pooled_projections": [N, DIM]} of the prompts, encoded with
    the shipped encoder (or `encoder`); the Conditioning fields builtin:flow-mnist takes."""
    if isinstance(prompts, str):
        prompts = [prompts]
    enc = encoder if encoder is not None else shipped_encoder()
    with torch.no_grad():
        hidden, pooled = enc(token_ids(list(prompts)))
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


def calibration_prompts(n: int = 20, seed: int = 0) -> list[str]:
    """n prompts, prompt j naming digit j % 10 (so sample i of a run shows digit i % 10), templates seeded."""
    rng = random.Random(seed)
    return [prompt_for(j % 10, rng) for j in range(n)]


def default_conditioning(n: int = 20, seed: int = 0, encoder: WordEncoder | None = None):
    """The calibration/sampling set when no prompt file is given: `calibration_prompts(n, seed)` with the
    empty prompt as the unconditional counterpart (classifier-free guidance)."""
    from diffpro_cli.models.conditioning import Conditioning

    cond = Conditioning(**encode_prompts(calibration_prompts(n, seed), encoder))
    cond.uncond = Conditioning(**encode_prompts([""] * n, encoder))
    return cond


def attach_default(model):
    """Give a model of this encoder (config text_encoder == NAME, e.g. a reloaded quantized checkpoint of
    builtin:flow-mnist) the default conditioning set when it has none; other models pass unchanged."""
    if model.conditioning_set is None and (model.config or {}).get("text_encoder") == NAME:
        model.conditioning_set = default_conditioning()
    return model
