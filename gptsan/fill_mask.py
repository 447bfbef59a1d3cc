"""[MASK] filling and hidden vectors (run_languagemodel.py).

One forward pass over `SOT tokens...`; as in training (shifted MLM) the logits at position i
predict token i+1. Two rule sets:

* published (HEAD run_languagemodel.py, the default): for a hybrid model the context is split
  at the mask marks (MSK between the pieces) and every slot but the last is bidirectional
  (`num_precontext` = slots - 1: the spout slot if any, SOT and all input tokens but the last);
  an lm model reads the marker as text, causally; an mlm model is refused. A MSK position takes
  the argmax of all logits, and `output_scores[i]` is the logit of input token i+1 -- the MSK
  id itself at a mask.
* prefix (`--fill_mode prefix`, the project's rules): masks are always split, every slot is
  bidirectional for hybrid and mlm models (training writes num_input = len(SOT + prefix)), a
  mask takes the best non-control, non-EOT id, and its score is the logit of that fill.

The vector of a position is every layer's output there, concatenated: [layers * d].
"""
import dataclasses
from typing import List

import numpy as np

from gptsan.errors import GPTSANError
from gptsan.sampling import NEG_INF, log_softmax, mask_logits

FILL_MODES = ("published", "prefix")


@dataclasses.dataclass
class FillResult:
    input_tokens: List[int]  # SOT + tokens (MSK at the split marks)
    output_tokens: List[int]  # one per input position after SOT: the input or the fill
    output_scores: List[float]  # see the module docstring
    output_logprobs: List[float]  # log-probability of each output token
    vectors: np.ndarray  # [s, layers, d] hidden states of every layer at every position


def fill_inputs(special, encode, context, mask, train_mode, fill_mode="published"):
    """(input tokens `SOT ...`, whether the input is read bidirectionally) for a context.

    encode: text -> ids; mask: the marker in `context`; train_mode: the model's lm | mlm | hybrid.
    """
    _require(fill_mode in FILL_MODES,
             f"unknown fill mode {fill_mode!r}; use one of {', '.join(FILL_MODES)}")
    if fill_mode == "published":
        _require(train_mode in ("lm", "hybrid"),
                 f"this is an {train_mode} model: the published rules fill lm and hybrid models "
                 "only; use --fill_mode prefix")
        if train_mode == "lm":
            return [special.sot] + encode(context), False
    tokens = [special.sot]
    for i, piece in enumerate(context.split(mask)):
        if i:
            tokens.append(special.msk)
        tokens.extend(encode(piece))
    return tokens, train_mode != "lm"


def num_precontext(length, spout_slots, bidirectional, fill_mode="published"):
    """Bidirectional memory slots of a fill input of `length` tokens (SOT included)."""
    if not bidirectional:
        return 0
    slots = length + spout_slots
    return slots - 1 if fill_mode == "published" else slots


def fill_mask(predictor, special, input_tokens, precontext, spout=None, fill_mode="published"):
    """Runs the model once and fills every MSK of `input_tokens` -> FillResult.

    precontext: the bidirectional memory slots (`num_precontext`); spout: None or float32
    [1, num_spout] (or [num_spout]).
    """
    ids = np.asarray(input_tokens, np.int32)[None]  # [1, s]
    out = predictor.forward(ids, num_precontext=np.array([precontext], np.int32), spout=spout)
    logits = np.asarray(out["logits"][0], np.float64)  # [s, vocab]
    output_tokens, scores, logprobs = [], [], []
    for i, target in enumerate(input_tokens[1:]):
        fill = target
        if target == special.msk:
            fill = _fill(logits[i], special, fill_mode)
        output_tokens.append(int(fill))
        scores.append(float(logits[i, target if fill_mode == "published" else fill]))
        logprobs.append(float(log_softmax(logits[i])[fill]))
    vectors = np.stack([np.asarray(h[0]) for h in out["hidden_states"]], axis=1)  # [s, L, d]
    return FillResult(list(map(int, input_tokens)), output_tokens, scores, logprobs, vectors)


def _fill(logits, special, fill_mode):
    """The id a MSK position takes: HEAD's plain argmax, or the best ordinary id (prefix)."""
    if fill_mode == "published":
        return int(np.argmax(logits))
    x = mask_logits(logits, special)
    x[special.eot] = NEG_INF  # a masked slot holds an ordinary token
    return int(np.argmax(x))


def resolve_position(pos, length):
    """--pos_vector: -1 (HEAD's default) = the last input token; other negatives count from
    the end (HEAD maps every negative value to the last token)."""
    index = pos + length if pos < 0 else pos
    _require(0 <= index < length, f"--pos_vector {pos} is out of range for an input of {length} "
             f"tokens (valid: {-length}..{length - 1})")
    return index


def _require(condition, message):
    if not condition:
        raise GPTSANError(message)
