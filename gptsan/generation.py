"""Text generation over the Predictor API: HEAD's row sampler, the project sampler, beam search.

The model is reached only through `Predictor.prefill/step/reorder_cache` (cached decoding) or
`Predictor.forward` (full recomputation, `use_cache=False`). Three decoders:

* published (default): HEAD run_generate.py. `beam_width` rows (HEAD default 4) each draw one
  token per step by `sampling.published_choice` (top-k 120 with a 1e-10 floor, NOT/SEP
  banned, EOT taken when it is the argmax); after every step each row that ended with EOT is
  kept as a finished text and replaced by a copy of the unfinished row with the best mean
  score (scores are raw logits). Every row, live and finished, is returned. Fed ids and the
  printed text follow HEAD (`gptsan.prompts`).
* sample: the project sampler (top-k / top-p / temperature / repetition penalty, SEP narrowed to
  sentence ends, log-probability scores), one row, `num_generate` samples; the prompt and the
  generated ids are fed like training data.
* beam: deterministic beam search over summed log-probabilities, fed like training data.

Without the cache, every step re-runs the whole sequence right-padded with EOT to
min(prompt + max_generate, model length) tokens -- HEAD's padding, which also fixes the Switch
layers' routing group (and so their expert capacity).
"""
import copy
import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from gptsan import fileio
from gptsan.errors import GPTSANError
from gptsan.prompts import append_output, expand_output, feed_token
from gptsan.sampling import (PUBLISHED_TOP_K_FLOOR, allowed_mask, choose_token, log_softmax,
                             mask_logits, published_choice, token_log_prob)

DECODERS = ("published", "sample", "beam")
PUBLISHED_TOP_K = 120  # HEAD run_generate.py --top_k default
PUBLISHED_ROWS = 4  # HEAD run_generate.py --beam_width default
PUBLISHED_MAX_GENERATE = 300  # HEAD run_generate.py --max_generate default
FINISHED_ROW_SCORE = -1e10  # HEAD's mean score of a row that ended with EOT
PREFILL_BUCKET = 32  # one-row prompts are prefilled padded to a multiple of this many tokens
NEG_INF = -np.inf
FINISH_EOT, FINISH_MAX, FINISH_CONTEXT = "eot", "max_generate", "context_full"


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass
class GenerationSettings:
    """Decoding options; the defaults are HEAD run_generate.py's."""
    decoder: str = "published"  # published | sample | beam (see the module docstring)
    max_generate: int = PUBLISHED_MAX_GENERATE
    num_generate: int = 1  # runs (published), samples (sample) or best hypotheses (beam)
    top_k: int = PUBLISHED_TOP_K  # 0 = no limit
    top_k_floor: float = PUBLISHED_TOP_K_FLOOR  # published: probability of ids outside top-k
    beam_width: int = PUBLISHED_ROWS  # published: rows; beam: hypotheses; sample: must be 1
    top_p: float = 1.0  # sample/beam only: nucleus sampling; 1.0 = off
    temperature: float = 1.0  # sample only: 0 = greedy
    repetition_penalty: float = 1.0  # sample/beam only: HF/CTRL style
    seed: Optional[int] = None  # numpy Generator seed for reproducible sampling
    use_cache: bool = True  # False: full recomputation with `forward` at every step
    allowed_tokens: Optional[Sequence[int]] = None  # sample/beam only: restrict the vocabulary

    def __post_init__(self):
        _require(self.decoder in DECODERS,
                 f"unknown decoder {self.decoder!r}; use one of {', '.join(DECODERS)}")
        _require(self.max_generate > 0, f"max_generate must be > 0, got {self.max_generate}")
        _require(self.num_generate > 0, f"num_generate must be > 0, got {self.num_generate}")
        _require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        _require(0.0 <= self.top_k_floor < 1.0,
                 f"top_k_floor must be in [0, 1), got {self.top_k_floor}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _require(self.repetition_penalty > 0.0,
                 f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _require(self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}")
        _require(self.decoder != "sample" or self.beam_width == 1,
                 "the sample decoder draws one row: use --beam_width 1 (or --decoder published)")
        _require(self.decoder != "beam" or self.num_generate <= self.beam_width,
                 f"num_generate={self.num_generate} cannot exceed beam_width={self.beam_width}")
        if self.decoder == "published":
            extras = [name for name, off in (("top_p", 1.0), ("temperature", 1.0),
                                             ("repetition_penalty", 1.0))
                      if getattr(self, name) != off]
            extras += ["allowed_tokens"] if self.allowed_tokens is not None else []
            _require(not extras, f"{', '.join(extras)} apply to the sample and beam decoders "
                     "(--decoder sample|beam), not to the published one")

    @property
    def published(self):
        return self.decoder == "published"

    @property
    def rows(self):
        """Model rows decoded side by side."""
        return 1 if self.decoder == "sample" else self.beam_width

    @property
    def greedy(self):
        return self.top_k == 1 or self.temperature == 0.0


@dataclasses.dataclass
class Generation:
    tokens: List[int]  # printed ids (BAG expanded, dropped ids removed): decode these
    model_tokens: List[int]  # ids chosen by the model (BAG, EOT included)
    scores: List[float]  # raw logit (published) or log-probability of each model token
    finish_reason: Optional[str] = None  # eot | max_generate | context_full (None: running)
    published: bool = False  # scores are raw logits, `score` is their mean (HEAD's ranking)
    run: int = 0  # which of the `num_generate` runs / samples produced it

    @property
    def score(self):
        if not self.scores:
            return 0.0
        return float(np.mean(self.scores) if self.published else np.sum(self.scores))

    def append(self, token, score, special):
        self.model_tokens.append(token)
        self.scores.append(score)
        append_output(self.tokens, token, special, self.published)


# --------------------------------------------------------------------------- model access
class _CachedModel:
    """Incremental decoding through the Predictor's K/V cache.

    HEAD's pass is right-padded with EOT to `length` tokens (min(prompt + max_generate, model
    length)), and the Switch layers' expert capacity grows with the tokens in a call (eval:
    max(2 * S / experts, 4) per group of S tokens): a short unpadded prompt could keep tokens
    that the padded pass drops, or the other way round. With one row the prompt is prefilled
    routed as that padded pass (`Predictor.prefill(routing_length=)`), its length rounded up
    to PREFILL_BUCKET so a few programs serve every prompt; with more rows the padding of one
    row precedes the next row in routing, so the rows are padded for real. Padding comes after
    the real tokens in routing priority and in the causal order, and the cache is then rewound
    to the real length: each step overwrites its slot and attends only to the slots before
    it, so the padding is never seen. A step routes its one token alone, so -- unlike HEAD's
    recomputation, where a late token can overflow an expert of the padded group -- generated
    tokens are never dropped by capacity.
    """

    def __init__(self, predictor, length):
        self.predictor, self.length = predictor, length

    def start(self, input_ids, num_precontext, spout):
        ids = np.asarray(input_ids, np.int32)  # [b, s]
        padded = _pad(ids, self.length,
                      self.predictor.model_config.num_vocabulary - 1)  # [b, length]
        routing_length = None
        if ids.shape[0] == 1:
            bucket = -(-ids.shape[1] // PREFILL_BUCKET) * PREFILL_BUCKET
            padded, routing_length = padded[:, :bucket], padded.shape[1]
        out = self.predictor.prefill(padded, num_precontext=num_precontext, spout=spout,
                                     routing_length=routing_length)
        self.prompt_slots = ids.shape[1] + _spout_slots(spout)
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
    """No cache: re-runs `forward` on the whole sequence at every step.

    As at HEAD the sequence is right-padded with EOT to `length` tokens (min(prompt +
    max_generate, model length)), so one compiled program serves every step and the routing
    group is HEAD's; causal attention keeps the padding out of the real positions' logits.
    """

    def __init__(self, predictor, length):
        self.predictor, self.length = predictor, length
        self.ids = None  # [b, padded length]
        self.filled = 0  # real tokens per row

    def start(self, input_ids, num_precontext, spout):
        ids = np.asarray(input_ids, np.int32)  # [b, s]
        eot = self.predictor.model_config.num_vocabulary - 1
        self.prompt = (_pad(ids, self.length, eot), ids.shape[1])  # [b, length], s
        self.num_precontext, self.spout = num_precontext, spout
        self.rewind()
        return self._last_logits()

    def rewind(self):
        self.ids, self.filled = self.prompt[0].copy(), self.prompt[1]

    def advance(self, tokens):
        self.ids[:, self.filled] = np.asarray(tokens, np.int32)
        self.filled += 1
        return self._last_logits()

    def reorder(self, indices):
        self.ids = self.ids[np.asarray(indices)]  # each row keeps its own spout (as at HEAD)

    def _last_logits(self):
        out = self.predictor.forward(self.ids, num_precontext=self.num_precontext,
                                     spout=self.spout)
        return out["logits"][:, self.filled - 1]  # [b, vocab]


def _pad(ids, length, eot):
    """[b, s] -> [b, length], right-padded with EOT (HEAD's padding)."""
    padded = np.full([ids.shape[0], length], eot, np.int32)
    padded[:, :ids.shape[1]] = ids
    return padded


def _spout_slots(spout):
    return 0 if spout is None else 1


def _model_for(predictor, prompt, settings):
    slots = predictor.max_length - prompt.spout_slots
    length = min(len(prompt.input_ids) + settings.max_generate, slots)  # HEAD's padding
    return (_CachedModel if settings.use_cache else _FullModel)(predictor, length)


def _batch_inputs(prompt, rows):
    """(ids [rows, s], num_precontext [rows], spout [rows, num_spout] or None)."""
    ids = np.tile(np.asarray(prompt.input_ids, np.int32)[None], [rows, 1])
    num_precontext = np.full([rows], prompt.num_precontext, np.int32)
    spout = None
    if prompt.spout is not None:
        spout = np.asarray(prompt.spout, np.float32)
        if spout.shape[0] != rows:
            spout = np.tile(spout[:1], [rows, 1])
    return ids, num_precontext, spout


def _limit(predictor, prompt, settings):
    """(new tokens per row, finish reason at that limit): the cache holds max_length slots."""
    capacity = predictor.max_length - prompt.spout_slots - len(prompt.input_ids) + 1
    if capacity <= 0:
        raise GPTSANError("the prompt fills the whole context: nothing can be generated")
    if capacity < settings.max_generate:
        return capacity, FINISH_CONTEXT
    return settings.max_generate, FINISH_MAX


# --------------------------------------------------------------------------- decoding
def generate(predictor, prompt, special, settings, on_token: Optional[Callable] = None,
             progress=False):
    """Decodes `prompt` with `settings.decoder` -> list[Generation] (see the module docstring).

    `on_token(index, generation)` is called after every token of a one-row decoder (published
    with beam_width 1, or sample), `index` being the run or sample number; the generation's
    `finish_reason` is set on the last call of each. `progress` shows a tqdm bar per run.
    """
    model = _model_for(predictor, prompt, settings)
    limit = _limit(predictor, prompt, settings)
    if settings.decoder == "beam":
        return beam_search(model, prompt, special, settings, limit)
    rng = np.random.default_rng(settings.seed)
    results = []
    for index in range(settings.num_generate):
        bar = tqdm(total=limit[0], desc=f"generating {index + 1}/{settings.num_generate}",
                   unit="token", disable=not progress, leave=False)
        callback = _callbacks(on_token, index, bar)
        if settings.published:
            rows = _published_rows(model, prompt, special, settings, rng, limit, callback)
            for result in rows:
                result.run = index
            results += rows
        else:
            if index == 0:
                first_logits = model.start(*_batch_inputs(prompt, 1))[0]  # one prefill for all
            else:
                model.rewind()
            results.append(_sample_one(model, first_logits, limit, prompt, special, settings,
                                       rng, callback))
            results[-1].run = index
        bar.close()
    return results


def _callbacks(on_token, index, bar):
    def after_token(generation, row=0):
        if row == 0:
            bar.update(1)
        if on_token is not None:
            on_token(index, generation)
    return after_token


def _published_rows(model, prompt, special, settings, rng, limit, after_token):
    """HEAD's rows (module docstring) -> live rows then finished rows, in HEAD's order."""
    rows = settings.rows
    logits = model.start(*_batch_inputs(prompt, rows))  # [rows, vocab]
    live = [Generation([], [], [], published=True) for _ in range(rows)]
    finished = []
    while True:
        for row, result in enumerate(live):
            token = published_choice(logits[row], special, settings.top_k, settings.top_k_floor,
                                     rng)
            result.append(token, float(logits[row][token]), special)
            if rows == 1:
                _finish_if_done(result, special, limit)
            after_token(result, row)
        order = _replace_finished_rows(live, finished, special)
        if all(r.model_tokens[-1] == special.eot or len(r.model_tokens) >= limit[0]
               for r in live):
            for result in live:
                _finish_if_done(result, special, limit)
            return live + finished
        model.reorder(order)
        logits = model.advance([r.model_tokens[-1] for r in live])


def _replace_finished_rows(live, finished, special):
    """HEAD: rows that ended with EOT move to `finished`; each is replaced by a copy of the
    live row with the best mean score. Returns the row order for the cache ([rows])."""
    means = [FINISHED_ROW_SCORE if r.model_tokens[-1] == special.eot else np.mean(r.scores)
             for r in live]
    best = int(np.argmax(means))
    order = list(range(len(live)))
    if means[best] == FINISHED_ROW_SCORE:
        return order  # every row ended: nothing to continue
    for row, result in enumerate(live):
        if result.model_tokens[-1] == special.eot:
            result.finish_reason = FINISH_EOT
            finished.append(result)
            live[row], order[row] = copy.deepcopy(live[best]), best
    return order


def _finish_if_done(result, special, limit):
    if result.model_tokens[-1] == special.eot:
        result.finish_reason = FINISH_EOT
    elif len(result.model_tokens) >= limit[0]:
        result.finish_reason = limit[1]


def _sample_one(model, logits, limit, prompt, special, settings, rng, after_token):
    """The project sampler: one row until EOT or the limit."""
    allowed = _settings_mask(settings, special)
    history = list(prompt.history)
    result = Generation([], [], [])
    while True:
        x = mask_logits(logits, special, history, settings.repetition_penalty, allowed)
        token = choose_token(x, settings, rng)
        result.append(token, token_log_prob(x, token), special)
        if not special.is_control(token):
            history.append(token)
        _finish_if_done(result, special, limit)
        after_token(result)
        if result.finish_reason is not None:
            return result
        logits = model.advance([feed_token(token, special, as_training=True)])[0]


def _settings_mask(settings, special):
    if settings.allowed_tokens is None:
        return None
    return allowed_mask(settings.allowed_tokens, special.vocab_size)


def beam_search(model, prompt, special, settings, limit):
    """Beam search over summed log-probabilities; returns the best `num_generate` finished.

    A hypothesis finishes at EOT or at the length limit. Search stops early once the best
    finished score beats every live beam (log-probabilities are <= 0, so live beams can only
    lose score). Deterministic: no sampling.
    """
    width = settings.beam_width
    limit, limit_reason = limit
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
        logits = model.advance([feed_token(r[2][-1], special, as_training=True) for r in rows])
    finished.sort(key=lambda f: -f[0])
    return [Generation(expand_output(tokens, special, published=False), tokens, scores, reason)
            for _, tokens, scores, reason in finished[:settings.num_generate]]


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


def open_predictor(model_dir, mesh_shape=None):
    """The Predictor (graph + restored weights) of a model directory."""
    from gptsan.inference import Predictor

    return Predictor(model_dir, mesh_shape=mesh_shape)


def _require(condition, message):
    if not condition:
        raise GPTSANError(message)
