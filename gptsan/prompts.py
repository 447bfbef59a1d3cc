"""What generation feeds the model and what it prints: prompts, spouts, fed and emitted ids.

Two conventions, chosen by the decoder (`GenerationSettings.decoder`):
* published (HEAD run_generate.py, the default): the prompt is `SOT SEG context` with the
  context encoded as is, and every generated id is fed back as it is. The printed text expands
  BAG into the previous token twice more and keeps only ids below HEAD's LAST_TOKEN
  (`id(<|byte0|>) - 1`): byte tokens, the last emoji class and the control ids are dropped.
* training (`--decoder sample|beam`): the prompt's context is rewritten like training data
  (`gptsan.data.lm_transform`: sentence-final punctuation fed as SEP, runs of 3+ equal tokens
  as `token BAG`) and a generated punctuation mark is fed back as SEP; the printed text keeps
  byte tokens (decode joins them into UTF-8 characters) and drops only the control ids.
`--prefix` (a project addition) makes a hybrid prompt `SOT prefix SEG context` whose first
`1 + len(prefix)` tokens are read bidirectionally; `num_precontext` is a memory index, so a
spout slot adds one.
"""
import dataclasses
import json
from typing import List, Optional

import numpy as np

from gptsan import fileio
from gptsan.data import lm_transform
from gptsan.errors import GPTSANError

BAG_EXTRA_REPEATS = 2  # HEAD run_generate.py appends the previous token twice per BAG
SPOUT_MODES = ("onehot", "half_onehot", "stateless_uniform")  # class-id spouts of training


# --------------------------------------------------------------------------- fed / emitted ids
def feed_token(token, special, as_training):
    """The id fed back to the model after `token` was generated."""
    return special.sep if as_training and token in special.dots else token


def append_output(out, token, special, published):
    """Appends to `out` the ids one generated token prints (see the module docstring)."""
    if token == special.bag:
        if out:
            out.extend([out[-1]] * BAG_EXTRA_REPEATS)
    elif token < special.last_token if published else not special.is_control(token):
        out.append(token)


def expand_output(model_tokens, special, published):
    """Generated ids -> printed ids (`append_output` over the whole list)."""
    out = []
    for token in model_tokens:
        append_output(out, token, special, published)
    return out


# --------------------------------------------------------------------------- prompts
@dataclasses.dataclass
class Prompt:
    """What is fed to the model before the first generated token."""
    input_ids: List[int]  # SOT [prefix] SEG context (context as fed)
    num_precontext: int  # bidirectional memory slots (spout slot + SOT + prefix), 0 without
    spout: Optional[np.ndarray] = None  # [rows, num_spout] float32, one vector per row
    history: List[int] = dataclasses.field(default_factory=list)  # ids for repetition penalty
    truncated: int = 0  # context tokens dropped by truncate="left"

    @property
    def spout_slots(self):
        return 0 if self.spout is None else 1


def build_prompt(special, context_ids, prefix_ids=(), spout=None, max_length=None,
                 max_generate=0, truncate="none", as_training=False):
    """`SOT [prefix] SEG context` with its num_precontext; checks it fits `max_length` slots.

    context_ids, prefix_ids: token ids as encoded (either may be empty); as_training: rewrite
    the context like training data. max_length: memory slots of the model (num_contexts; a
    spout takes one). truncate="left" drops the oldest context tokens so that the prompt plus
    `max_generate` new tokens fit (never the prefix).
    """
    _require(truncate in ("none", "left"), f"truncate must be none or left, got {truncate!r}")
    context_ids, prefix_ids = list(context_ids), list(prefix_ids)
    spout_slots = 0 if spout is None else 1
    head = [special.sot] + prefix_ids + [special.seg]
    body = lm_transform(context_ids, special)[0].tolist() if as_training else context_ids
    dropped = 0
    if max_length is not None:
        room = max_length - spout_slots - len(head)  # slots left for context + generation
        if truncate == "left":
            _require(room > 0, f"the prefix is {len(prefix_ids)} tokens but the model takes at "
                     f"most {max_length - spout_slots - 2} prefix tokens")
            keep = max(min(len(body), room - max_generate), min(len(body), 1), 0)
            dropped = len(body) - keep
            if 0 < dropped < len(body) and body[dropped] == special.bag:
                dropped += 1  # never start with the BAG of a cut-off run
            body = body[dropped:]
        elif len(body) > room:
            raise GPTSANError(
                f"the prompt is {len(head) + len(body) + spout_slots} tokens (with SOT/SEG"
                f"{' and the spout slot' if spout_slots else ''}) but the model takes at most "
                f"{max_length}; shorten the context or use --truncate left")
    num_precontext = spout_slots + 1 + len(prefix_ids) if prefix_ids else 0
    history = [t for t in prefix_ids + context_ids if not special.is_control(t)]
    return Prompt(head + body, num_precontext, spout, history, dropped)


# --------------------------------------------------------------------------- spouts
def parse_spout(spec, num_spout, rows=1, seed=None, mode="onehot"):
    """`none|uniform|zeros|<class id>|<file.npy|file.json>` -> float32 [rows, num_spout] or None.

    As at HEAD, `uniform` draws one vector per row and a class id is a one-hot vector that
    must be < num_spout (`--spout_mode` other than onehot reproduces that training spout).
    """
    spec = (spec or "none").strip()
    if spec == "none":
        return None
    _require(num_spout > 0, f"--spout {spec}: this model has no spout input (num_spout=0)")
    if spec == "uniform":
        return np.random.default_rng(seed).uniform(0.0, 1.0, [rows, num_spout]).astype(np.float32)
    if spec == "zeros":
        vector = np.zeros([num_spout], np.float32)
    elif spec.lstrip("-").isdigit():
        vector = class_spout_vector(int(spec), num_spout, mode, seed or 0)
    elif spec.endswith(".npy") or spec.endswith(".json"):
        vector = _load_vector(spec)
    else:
        raise GPTSANError(f"unknown spout {spec!r}: use none, uniform, zeros, a class id (integer "
                          ">= 0) or a .npy/.json vector file")
    from gptsan.spout import check_spout_input

    return check_spout_input(vector, num_spout, rows, f"spout vector {spec}")


def class_spout_vector(class_id, num_spout, mode="onehot", seed=0):
    """The spout training feeds for class id `class_id` -> float32 [num_spout] (gptsan.spout)."""
    _require(mode in SPOUT_MODES,
             f"unknown spout mode {mode!r}; use one of {', '.join(SPOUT_MODES)}")
    _require(class_id >= 0, f"unknown spout class {class_id}: class ids are >= 0 (the `i` "
             "feature of the training data)")
    _require(mode != "onehot" or class_id < num_spout,
             f"spout class {class_id} is out of range for num_spout={num_spout} (one-hot ids are "
             f"0..{num_spout - 1})")
    from gptsan.spout import class_spout_vector as training_spout_vector

    return training_spout_vector(class_id, num_spout, mode, seed)


def _load_vector(path):
    if not fileio.isfile(path):
        raise GPTSANError(f"spout file not found: {path}")
    try:
        if path.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                data = data.get("spout", data.get("vector"))
        vector = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError, OSError) as err:
        raise GPTSANError(f"cannot read spout vector {path}: {err}") from None
    return vector


def add_spout_arguments(parser):
    """The --spout / --spout_mode flags shared by run_generate.py and run_languagemodel.py."""
    parser.add_argument("--spout", default="none",
                        help="none | uniform | zeros | class id | vector file (.npy / .json)")
    parser.add_argument("--spout_mode", default="onehot", choices=SPOUT_MODES,
                        help="how a class id becomes a spout (the run_train.py --spout_vector "
                             "used)")


def _require(condition, message):
    if not condition:
        raise GPTSANError(message)

