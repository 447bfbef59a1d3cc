"""Choosing one token from a row of logits: the published rule and the project's sampler.

Published rule (HEAD run_generate.py, the default decoder): if EOT is the raw argmax it is
taken; otherwise NOT and SEP are banned, the logits go through a softmax, the `top_k` most
likely ids keep their probability and every other id gets `floor` (HEAD: 1e-10), and one id is
drawn from the renormalised result. The score of a token is its raw logit.

Project sampler (`--decoder sample|beam`): `mask_logits` applies a repetition penalty, bans the
control ids and narrows a SEP top choice to sentence ends; temperature, top-k and top-p shape
the sampling; scores are log-probabilities.
"""
import numpy as np

NEG_INF = -np.inf
PUBLISHED_TOP_K_FLOOR = 1e-10  # HEAD run_generate.py: probability given to ids outside the top k


# --------------------------------------------------------------------------- published rule
def published_distribution(logits, special, top_k, floor=PUBLISHED_TOP_K_FLOOR):
    """HEAD's sampling probabilities -> float64 [vocab] (NOT/SEP banned, top-k with a floor).

    top_k 0 keeps every id. Banned ids fall outside the top k, so they get `floor` as well
    (as at HEAD; floor 0 makes the ban and the top-k cut exact).
    """
    x = np.array(logits, dtype=np.float64)  # [vocab]
    x[[special.not_token, special.sep]] = NEG_INF
    probs = np.exp(x - np.max(x))
    probs /= probs.sum()
    k = probs.size if top_k <= 0 else min(top_k, probs.size)
    kth = np.partition(probs, -k)[-k]  # the k-th largest probability
    probs = np.where(probs < kth, floor, probs)
    return probs / probs.sum()


def published_choice(logits, special, top_k, floor, rng):
    """One id by HEAD's rule: EOT when it is the raw argmax, else a draw from
    `published_distribution`."""
    if int(np.argmax(logits)) == special.eot:
        return special.eot
    return draw(published_distribution(logits, special, top_k, floor), rng)


def draw(probs, rng):
    """Inverse-CDF draw of one id from probabilities `probs` [vocab] (need not sum to 1)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


# --------------------------------------------------------------------------- project sampler
def mask_logits(logits, special, history=(), repetition_penalty=1.0, allowed=None):
    """Deterministic part of the project sampler -> float64 [vocab], -inf for banned ids.

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
    shifted = x - np.max(x)
    return shifted - np.log(np.sum(np.exp(shifted)))


def token_log_prob(x, token):
    """log_softmax(x)[token] without building the whole log-softmax vector."""
    top = np.max(x)
    return float(x[token] - top - np.log(np.sum(np.exp(x - top))))


def sampling_distribution(x, temperature=1.0, top_k=0, top_p=1.0):
    """Masked logits -> sampling probabilities (temperature, top-k, top-p), float64 [vocab]."""
    x = x / temperature
    if 0 < top_k < np.sum(np.isfinite(x)):
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, NEG_INF, x)
    probs = np.exp(x - np.max(x))
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        cut = int(np.searchsorted(cumulative, top_p)) + 1  # keep the crossing token
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    return probs


def choose_token(x, settings, rng):
    """Project sampler: argmax when greedy, else a draw from `sampling_distribution`."""
    if settings.greedy:
        return int(np.argmax(x))
    return draw(sampling_distribution(x, settings.temperature, settings.top_k, settings.top_p),
                rng)
