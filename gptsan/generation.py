"""Text generation over the Predictor API: sampling, beam search, prompts, spouts, MASK fill.

Pure NumPy logic; the model is reached only through `Predictor.prefill/step/reorder_cache`
(cached decoding) or `Predictor.forward` (full recomputation, `use_cache=False`).

Conventions taken from the published training data (make_tfrecord.py) so that what the model
sees at generation time looks like what it saw in training:
* plain prompt: `SOT SEG context`; hybrid prompt: `SOT prefix SEG context`, with the first
  `1 + len(prefix)` tokens bidirectional (training writes `num_input = len(SOT + prefix)`);
  `num_precontext` is a memory index, so a spout slot adds one.
* in the LM part sentence-final punctuation is fed as SEP (targets keep the real token): a
  generated "。" is emitted but fed back as SEP, and the context is fed the same way; a run of
  3+ equal word tokens is fed as `token BAG`, and an emitted BAG stands for the previous token
  twice more (published run_generate.py). The prompt goes through `gptsan.data.lm_transform`,
  the project's training rewrite, with the same `gptsan.data.SpecialTokens`; unlike the
  published make_tfrecord.py it keeps a line end as <BR> instead of feeding it as SEP.
* the model never emits SOT/MSK/SEP/NOT/SEG; when SEP would be its top choice, the choice is
  narrowed to sentence-final punctuation, newline or EOT (published: "SEP means a full stop or
  EOT, whichever is more likely").

Scores are log-probabilities `log_softmax(logits)` after the deterministic masking above and
the repetition penalty (temperature, top-k and top-p shape the sampling only); a sequence's
score is their sum, the quantity beam search maximises.
"""
import dataclasses
import json
import os
from typing import Callable, List, Optional, Sequence

import numpy as np

from gptsan.data import SpecialTokens, lm_transform  # noqa: F401 (callers use gen.SpecialTokens)
from gptsan import fileio
from gptsan.errors import GPTSANError

BAG_EXTRA_REPEATS = 2  # published run_generate.py appends the previous token twice per BAG
NEG_INF = -np.inf
PREFILL_BUCKET = 32  # one-row prompts are prefilled padded to a multiple of this many tokens
SPOUT_MODES = ("onehot", "half_onehot", "stateless_uniform")  # class-id spouts of training
FINISH_EOT, FINISH_MAX, FINISH_CONTEXT = "eot", "max_generate", "context_full"


# --------------------------------------------------------------------------- LM feed
def feed_token(token, special):
    """The id fed back to the model after `token` was generated (lm_transform of one token)."""
    return special.sep if token in special.dots else token


def expand_output(model_tokens, special):
    """Model tokens -> emitted ids: BAG repeats the previous token, controls are dropped.

    (The published script also dropped byte tokens; they are kept here, `decode` joins them
    into UTF-8 characters.)
    """
    out = []
    for token in model_tokens:
        append_output(out, token, special)
    return out


def append_output(out, token, special):
    """Appends to `out` the ids one model token emits (see `expand_output`)."""
    if token == special.bag:
        if out:
            out.extend([out[-1]] * BAG_EXTRA_REPEATS)
    elif not special.is_control(token):
        out.append(token)


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass
class GenerationSettings:
    """Decoding options (defaults of the published run_generate.py where it had the flag)."""
    max_generate: int = 300  # published default
    num_generate: int = 1  # samples (or best beam hypotheses) to return
    top_k: int = 40  # published default; 0 = no limit, 1 = greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    temperature: float = 1.0  # 0 = greedy
    repetition_penalty: float = 1.0  # HF/CTRL style: logit/p if > 0 else logit*p
    beam_width: int = 1  # > 1: beam search (deterministic)
    seed: Optional[int] = None  # numpy Generator seed for reproducible sampling
    use_cache: bool = True  # False: full recomputation with `forward` at every step
    allowed_tokens: Optional[Sequence[int]] = None  # restrict the output vocabulary

    def __post_init__(self):
        _require(self.max_generate > 0, f"max_generate must be > 0, got {self.max_generate}")
        _require(self.num_generate > 0, f"num_generate must be > 0, got {self.num_generate}")
        _require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _require(self.repetition_penalty > 0.0,
                 f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _require(self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}")
        _require(self.beam_width == 1 or self.num_generate <= self.beam_width,
                 f"num_generate={self.num_generate} cannot exceed beam_width={self.beam_width}")

    @property
    def greedy(self):
        return self.top_k == 1 or self.temperature == 0.0


# --------------------------------------------------------------------------- prompts
@dataclasses.dataclass
class Prompt:
    """What is fed to the model before the first generated token."""
    input_ids: List[int]  # SOT [prefix] SEG context (context as fed: SEP/BAG applied)
    num_precontext: int  # bidirectional memory slots (spout slot + SOT + prefix)
    spout: Optional[np.ndarray] = None  # [num_spout] float32
    history: List[int] = dataclasses.field(default_factory=list)  # ids for repetition penalty
    truncated: int = 0  # context tokens dropped by truncate="left"

    @property
    def spout_slots(self):
        return 0 if self.spout is None else 1


def build_prompt(special, context_ids, prefix_ids=(), spout=None, max_length=None,
                 max_generate=0, truncate="none"):
    """`SOT [prefix] SEG context` with its num_precontext; checks it fits `max_length` slots.

    context_ids, prefix_ids: token ids as encoded; max_length: memory slots of the model
    (num_contexts; a spout takes one). truncate="left" drops the oldest context tokens so
    that the prompt plus `max_generate` new tokens fit (never the prefix).
    """
    _require(truncate in ("none", "left"), f"truncate must be none or left, got {truncate!r}")
    context_ids, prefix_ids = list(context_ids), list(prefix_ids)
    _require(context_ids or prefix_ids, "the context is empty: give --context (or --prefix)")
    spout_slots = 0 if spout is None else 1
    head = [special.sot] + prefix_ids + [special.seg]
    body = lm_transform(context_ids, special)[0].tolist()  # fed as in training
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
def class_spout_vector(class_id, num_spout, mode="onehot", seed=0):
    """The spout training feeds for class id `class_id` -> float32 [num_spout] (gptsan.spout)."""
    _require(mode in SPOUT_MODES,
             f"unknown spout mode {mode!r}; use one of {', '.join(SPOUT_MODES)}")
    from gptsan.spout import class_spout_vector as training_spout_vector

    return training_spout_vector(class_id, num_spout, mode, seed)


def parse_spout(spec, num_spout, seed=None, mode="onehot"):
    """`none|uniform|zeros|<class id>|<file.npy|file.json>` -> float32 [num_spout] or None."""
    spec = (spec or "none").strip()
    if spec == "none":
        return None
    _require(num_spout > 0, f"--spout {spec}: this model has no spout input (num_spout=0)")
    if spec == "zeros":
        return np.zeros([num_spout], np.float32)
    if spec == "uniform":
        return np.random.default_rng(seed).uniform(0.0, 1.0, num_spout).astype(np.float32)
    if spec.lstrip("-").isdigit():
        class_id = int(spec)
        _require(class_id >= 0, f"unknown spout class {class_id}: class ids are >= 0 (the "
                 "`i` feature of the training data; onehot wraps them mod num_spout)")
        return class_spout_vector(class_id, num_spout, mode, seed or 0)
    if spec.endswith(".npy") or spec.endswith(".json"):
        vector = _load_vector(spec)
        _require(vector.shape == (num_spout,),
                 f"spout vector {spec} has shape {list(vector.shape)} but the model expects "
                 f"[{num_spout}] (num_spout)")
        return vector
    raise GPTSANError(f"unknown spout {spec!r}: use none, uniform, zeros, a class id (integer "
                      ">= 0) or a .npy/.json vector file")


def _load_vector(path):
    if not os.path.isfile(path):
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
    _require(np.all(np.isfinite(vector)), f"spout vector {path} has non-finite values")
    return vector


# --------------------------------------------------------------------------- logits
def mask_logits(logits, special, history=(), repetition_penalty=1.0, allowed=None):
    """Deterministic part of logits processing -> float64 [vocab] with -inf for banned ids.

    Applies the repetition penalty over `history`, bans SOT/MSK/NOT/SEG (and ids outside
    `allowed`), and resolves SEP: if SEP is the best remaining choice the choice is narrowed to
    sentence-final punctuation, newline or EOT; SEP itself is never chosen.
    """
    x = np.array(logits, dtype=np.float64)  # [vocab]
    if repetition_penalty != 1.0 and len(history):
        ids = np.unique(np.asarray(history, dtype=np.int64))
        x[ids] = np.where(x[ids] > 0, x[ids] / repetition_penalty, x[ids] * repetition_penalty)
    banned = np.zeros(x.shape, bool)
    banned[[special.sot, special.msk, special.not_token, special.seg]] = True
    if allowed is not None:
        banned |= ~allowed_mask(allowed, x.shape[0])
        banned[special.sep] = False  # SEP stands for its expansions, checked below
    ends = sorted(special.dots) + ([special.nl] if special.nl is not None else []) \
        + [special.eot]
    ends = np.array([t for t in ends if not banned[t]], dtype=np.int64)  # SEP's expansions
    x[banned] = NEG_INF
    if ends.size and int(np.argmax(x)) == special.sep:
        narrowed = np.full_like(x, NEG_INF)
        narrowed[ends] = x[ends]
        x = narrowed
    x[special.sep] = NEG_INF
    return x


def allowed_mask(allowed, vocab_size):
    """Token ids (or an already built bool mask) -> bool [vocab_size]."""
    allowed = np.asarray(allowed)
    if allowed.dtype == bool and allowed.shape == (vocab_size,):
        return allowed
    mask = np.zeros([vocab_size], bool)
    mask[allowed.astype(np.int64)] = True
    return mask


def log_softmax(x):
    """Stable log-softmax of a float64 vector that may hold -inf."""
    top = np.max(x)
    shifted = x - top
    return shifted - np.log(np.sum(np.exp(shifted)))


def token_log_prob(x, token):
    """log_softmax(x)[token] without building the whole log-softmax vector."""
    top = np.max(x)
    return float(x[token] - top - np.log(np.sum(np.exp(x - top))))


def sampling_distribution(x, settings):
    """Masked logits -> sampling probabilities (temperature, top-k, top-p), float64 [vocab]."""
    x = x / settings.temperature
    if settings.top_k > 0 and settings.top_k < np.sum(np.isfinite(x)):
        kth = np.partition(x, -settings.top_k)[-settings.top_k]
        x = np.where(x < kth, NEG_INF, x)
    probs = np.exp(x - np.max(x))
    probs /= probs.sum()
    if settings.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        cut = int(np.searchsorted(cumulative, settings.top_p)) + 1  # keep the crossing token
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    return probs


def choose_token(x, settings, rng):
    """Picks one id from masked logits: argmax when greedy, else inverse-CDF sampling."""
    if settings.greedy:
        return int(np.argmax(x))
    probs = sampling_distribution(x, settings)
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


# --------------------------------------------------------------------------- model access
class _CachedModel:
    """Incremental decoding through the Predictor's K/V cache.

    The published run_generate.py ran every pass right-padded with EOT to the model length,
    and the Switch layers' expert capacity grows with the tokens in a call (eval:
    max(2 * S / experts, 4) per group of S tokens): a short unpadded prompt could lose tokens
    to capacity that the published code (and our full recomputation) keeps. With one row the
    prompt is prefilled routed as that padded pass (`Predictor.prefill(routing_length=)`),
    its length rounded up to PREFILL_BUCKET so a few programs serve every prompt; with more
    rows (beams) the padding of one row precedes the next row in routing, so the rows are
    padded for real. Padding comes after the real tokens in routing priority and in the
    causal order, and the cache is then rewound to the real length: each step overwrites its
    slot and attends only to the slots before it, so the padding's keys/values are never seen.
    """

    def __init__(self, predictor):
        self.predictor = predictor

    def start(self, input_ids, num_precontext, spout):
        ids = np.asarray(input_ids, np.int32)  # [b, s]
        padded = _pad(ids, self.predictor, spout)  # [b, slots]
        routing_length = None
        if ids.shape[0] == 1:
            bucket = -(-ids.shape[1] // PREFILL_BUCKET) * PREFILL_BUCKET
            padded, routing_length = padded[:, :bucket], padded.shape[1]
        out = self.predictor.prefill(padded, num_precontext=num_precontext, spout=spout,
                                     routing_length=routing_length)
        self.prompt_slots = ids.shape[1] + (0 if spout is None else 1)
        self.rewind()
        return out["logits"][:, ids.shape[1] - 1]  # [b, vocab]

    def rewind(self):
        """Back to the end of the prompt (its cache slots are never overwritten)."""
        self.predictor.rewind(self.prompt_slots)

    def advance(self, tokens):
        return self.predictor.step(np.asarray(tokens, np.int32))["logits"]  # [b, vocab]

    def reorder(self, indices):
        self.predictor.reorder_cache(np.asarray(indices, np.int32))


class _FullModel:
    """No cache: re-runs `forward` on the whole sequence at every step (reference/bench).

    Like the published run_generate.py the sequence is right-padded with EOT to the model
    length, so one compiled program serves every step; causal attention keeps the padding
    out of the real positions' logits.
    """

    def __init__(self, predictor):
        self.predictor = predictor
        self.ids = None  # [b, padded length]
        self.length = 0  # real tokens per row
        self.num_precontext = self.spout = None

    def start(self, input_ids, num_precontext, spout):
        ids = np.asarray(input_ids, np.int32)  # [b, s]
        self.prompt = (_pad(ids, self.predictor, spout), ids.shape[1])  # [b, slots], s
        self.num_precontext, self.spout = num_precontext, spout
        self.rewind()
        return self._last_logits()

    def rewind(self):
        self.ids, self.length = self.prompt[0].copy(), self.prompt[1]

    def advance(self, tokens):
        self.ids[:, self.length] = np.asarray(tokens, np.int32)
        self.length += 1
        return self._last_logits()

    def reorder(self, indices):
        self.ids = self.ids[np.asarray(indices)]

    def _last_logits(self):
        out = self.predictor.forward(self.ids, num_precontext=self.num_precontext,
                                     spout=self.spout)
        return out["logits"][:, self.length - 1]  # [b, vocab]


def _pad(ids, predictor, spout):
    """[b, s] -> [b, max_length - spout slot], right-padded with EOT (published padding)."""
    slots = predictor.max_length - (0 if spout is None else 1)
    eot = predictor.model_config.num_vocabulary - 1
    padded = np.full([ids.shape[0], slots], eot, np.int32)
    padded[:, :ids.shape[1]] = ids
    return padded


def _model_for(predictor, use_cache):
    return _CachedModel(predictor) if use_cache else _FullModel(predictor)


def _batch_inputs(prompt, rows):
    ids = np.tile(np.asarray(prompt.input_ids, np.int32)[None], [rows, 1])  # [rows, s]
    num_precontext = np.full([rows], prompt.num_precontext, np.int32)  # [rows]
    spout = None
    if prompt.spout is not None:
        spout = np.tile(np.asarray(prompt.spout, np.float32)[None], [rows, 1])  # [rows, spout]
    return ids, num_precontext, spout


def _capacity(predictor, prompt):
    """New tokens that fit: the cache holds max_length slots (spout slot included)."""
    max_length = getattr(predictor, "max_length", None)
    if max_length is None:
        return None
    return max_length - prompt.spout_slots - len(prompt.input_ids) + 1


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class Generation:
    tokens: List[int]  # emitted ids (BAG expanded, controls dropped): decode these
    model_tokens: List[int]  # ids chosen by the model (BAG, EOT included)
    scores: List[float]  # log-probability of each model token
    finish_reason: Optional[str]  # eot | max_generate | context_full (None while running)

    @property
    def score(self):
        return float(np.sum(self.scores)) if self.scores else 0.0


def generate(predictor, prompt, special, settings, on_token: Optional[Callable] = None):
    """Generates `settings.num_generate` continuations of `prompt` -> list[Generation].

    Sampling/greedy runs the samples one after another (batch 1, one numpy Generator seeded
    with `settings.seed`, so output is reproducible); beam search uses `beam_width` rows.
    `on_token(sample_index, generation)` is called after every sampled token (streaming);
    `generation.finish_reason` is set on the last call of each sample.
    """
    if settings.beam_width > 1:
        return beam_search(predictor, prompt, special, settings)
    rng = np.random.default_rng(settings.seed)
    model = _model_for(predictor, settings.use_cache)
    limit = _limit(predictor, prompt, settings)
    first_logits = model.start(*_batch_inputs(prompt, 1))[0]  # one prefill for all samples
    results = []
    for index in range(settings.num_generate):
        if index:
            model.rewind()
        results.append(_sample_one(model, first_logits, limit, prompt, special, settings, rng,
                                   index, on_token))
    return results


def _sample_one(model, logits, limit, prompt, special, settings, rng, index, on_token):
    allowed = _settings_mask(settings, special)
    history = list(prompt.history)
    result = Generation([], [], [], None)
    while True:
        x = mask_logits(logits, special, history, settings.repetition_penalty, allowed)
        token = choose_token(x, settings, rng)
        result.model_tokens.append(token)
        result.scores.append(token_log_prob(x, token))
        if not special.is_control(token):
            history.append(token)
        append_output(result.tokens, token, special)
        if token == special.eot:
            result.finish_reason = FINISH_EOT
        elif len(result.model_tokens) >= limit[0]:
            result.finish_reason = limit[1]
        if on_token is not None:
            on_token(index, result)
        if result.finish_reason is not None:
            return result
        logits = model.advance([feed_token(token, special)])[0]


def _settings_mask(settings, special):
    if settings.allowed_tokens is None:
        return None
    return allowed_mask(settings.allowed_tokens, special.vocab_size)


def _limit(predictor, prompt, settings):
    capacity = _capacity(predictor, prompt)
    if capacity is not None and capacity <= 0:
        raise GPTSANError("the prompt fills the whole context: nothing can be generated")
    if capacity is not None and capacity < settings.max_generate:
        return capacity, FINISH_CONTEXT
    return settings.max_generate, FINISH_MAX


def beam_search(predictor, prompt, special, settings):
    """Beam search over summed log-probabilities; returns the best `num_generate` finished.

    A hypothesis finishes at EOT or at the length limit. Search stops early once the best
    finished score beats every live beam (log-probabilities are <= 0, so live beams can only
    lose score). Deterministic: no sampling.
    """
    width = settings.beam_width
    model = _model_for(predictor, settings.use_cache)
    limit, limit_reason = _limit(predictor, prompt, settings)
    logits = model.start(*_batch_inputs(prompt, width))  # [width, vocab]
    allowed = _settings_mask(settings, special)
    beams = [[] for _ in range(width)]  # model tokens per row
    beam_scores = [[] for _ in range(width)]
    totals = np.full([width], NEG_INF)
    totals[0] = 0.0  # all rows hold the same prompt: expand only row 0 at first
    finished = []  # (total, tokens, scores, reason)
    for length in range(1, limit + 1):
        candidates = []  # (total, row, token, logp)
        for row in range(width):
            if not np.isfinite(totals[row]):
                continue
            history = prompt.history + [t for t in beams[row] if not special.is_control(t)]
            x = mask_logits(logits[row], special, history, settings.repetition_penalty,
                            allowed)
            logp = log_softmax(x)
            k = min(2 * width, logp.size)
            best = np.argpartition(-logp, k - 1)[:k]  # the 2*width best (ties: any order)
            candidates += [(totals[row] + logp[t], row, int(t), float(logp[t]))
                           for t in best if np.isfinite(logp[t])]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        next_rows = []
        for total, row, token, logp in candidates:
            tokens, scores = beams[row] + [token], beam_scores[row] + [logp]
            if token == special.eot:
                finished.append((total, tokens, scores, FINISH_EOT))
            elif length == limit:
                finished.append((total, tokens, scores, limit_reason))
            else:
                next_rows.append((total, row, tokens, scores))
            if len(next_rows) == width:
                break
        best_live = next_rows[0][0] if next_rows else NEG_INF
        finished.sort(key=lambda f: -f[0])
        if not next_rows or (len(finished) >= settings.num_generate
                             and finished[settings.num_generate - 1][0] >= best_live):
            break
        pad = width - len(next_rows)  # dead rows (score -inf) keep the batch shape static
        rows = next_rows + [next_rows[0]] * pad
        totals = np.array([r[0] for r in next_rows] + [NEG_INF] * pad)
        beams, beam_scores = [r[2] for r in rows], [r[3] for r in rows]
        model.reorder([r[1] for r in rows])
        fed = [feed_token(r[2][-1], special) for r in rows]
        logits = model.advance(fed)
    finished.sort(key=lambda f: -f[0])
    return [Generation(expand_output(tokens, special), tokens, scores, reason)
            for _, tokens, scores, reason in finished[:settings.num_generate]]


# --------------------------------------------------------------------------- MASK fill
@dataclasses.dataclass
class FillResult:
    input_tokens: List[int]  # SOT + tokens with MSK at the marks
    output_tokens: List[int]  # one per input position after SOT: the input or the fill
    output_scores: List[float]  # logit of each output token at the position before it
    output_logprobs: List[float]  # log-probability of each output token
    vectors: np.ndarray  # [s, layers, d] hidden states of every layer at every position


def mask_fill_inputs(special, pieces_ids):
    """Token ids of the pieces between masks -> `SOT piece MSK piece ...` (published layout)."""
    tokens = [special.sot]
    for i, piece in enumerate(pieces_ids):
        if i:
            tokens.append(special.msk)
        tokens.extend(piece)
    return tokens


def fill_mask(predictor, special, input_tokens, bidirectional=True, spout=None):
    """Shifted MLM: logits at position i predict token i+1; MSK positions take the argmax.

    `bidirectional`: the whole input is the prefix (hybrid/mlm models; training writes
    num_input = len(SOT + prefix), plus the spout slot with a spout); False for lm-only
    models (published: num_precontext 0). `spout`: None or float32 [num_spout].
    """
    ids = np.asarray(input_tokens, np.int32)[None]  # [1, s]
    slots = len(input_tokens) + (0 if spout is None else 1)
    num_precontext = np.array([slots if bidirectional else 0], np.int32)
    out = predictor.forward(ids, num_precontext=num_precontext, spout=spout)
    logits = np.asarray(out["logits"][0], np.float64)  # [s, vocab]
    output_tokens, scores, logprobs = [], [], []
    for i in range(len(input_tokens) - 1):
        target = input_tokens[i + 1]
        if target == special.msk:
            x = mask_logits(logits[i], special)
            x[special.eot] = NEG_INF  # a masked slot holds an ordinary token
            target = int(np.argmax(x))
        output_tokens.append(int(target))
        scores.append(float(logits[i, target]))
        logprobs.append(float(log_softmax(logits[i])[target]))
    vectors = np.stack([np.asarray(h[0]) for h in out["hidden_states"]], axis=1)  # [s, L, d]
    return FillResult(list(map(int, input_tokens)), output_tokens, scores, logprobs, vectors)


def add_spout_arguments(parser):
    """The --spout / --spout_mode flags shared by run_generate.py and run_languagemodel.py."""
    parser.add_argument("--spout", default="none",
                        help="none | uniform | zeros | class id | vector file (.npy / .json)")
    parser.add_argument("--spout_mode", default="onehot", choices=SPOUT_MODES,
                        help="how a class id becomes a spout (the run_train.py --spout_vector "
                             "used)")


def resolve_position(pos, length):
    """Published --pos_vector: -1 (default) = the last input token; negatives count from the end."""
    index = pos + length if pos < 0 else pos
    _require(0 <= index < length, f"--pos_vector {pos} is out of range for an input of {length} "
             f"tokens (valid: {-length}..{length - 1})")
    return index


# --------------------------------------------------------------------------- CLI plumbing
def open_model_files(model_dir, vocabulary=None, emoji=None):
    """(SWEEncoder, GPTSANConfig) of `--model DIR` (no TensorFlow yet: checks fail fast).

    Everything comes from the model directory; `vocabulary`/`emoji` replace its copies (they
    must be the vocabulary the directory records: gptsan.fingerprint).
    """
    from gptsan import fingerprint
    from gptsan.config import PARAMETERS_FILE, GPTSANConfig
    from gptsan.tokenization import SWEEncoder

    _require(fileio.isdir(model_dir), f"model directory not found: {model_dir}")
    _require(fileio.isfile(fileio.join(model_dir, PARAMETERS_FILE)),
             f"{model_dir} is not a GPTSAN model directory (no {PARAMETERS_FILE})")
    config = GPTSANConfig.from_json_file(model_dir)
    files = fingerprint.model_vocabulary(model_dir, config, vocabulary, emoji)
    fingerprint.announce(files)
    encoder = SWEEncoder.from_files(files.vocab, files.emoji)
    config.model.validate_vocabulary(len(encoder), source=files.vocab)
    return encoder, config


def open_predictor(model_dir, batch_size=1, mesh_shape=None):
    """The Predictor (graph + restored weights) of a model directory."""
    from gptsan.inference import Predictor

    return Predictor(model_dir, mesh_shape=mesh_shape, batch_size=batch_size)


def _require(condition, message):
    if not condition:
        raise GPTSANError(message)
