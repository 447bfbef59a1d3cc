"""The training objective: the masked LM cross entropy with z-loss, plus the weighted
Switch load-balancing loss (docs/ARCHITECTURE.md "Training loss").

The loss a run reports (progress bar, the Estimator's `loss` summary) is the cross entropy
without the load-balancing term, as published.
"""
from gptsan.compat import mtf, tf
from gptsan.layers import softmax_cross_entropy


Z_LOSS = 1e-4  # published: softmax_cross_entropy_with_logits(..., z_loss=1e-4)
LOSS_DENOMINATOR_EPSILON = 1e-5  # published: sum(mask * loss) / (sum(mask) + 1e-5)
# published: loss += 1e-2 * the Switch load-balancing losses (docs/ARCHITECTURE.md "Training loss")
AUX_LOSS_WEIGHT = 1e-2


def lm_loss(logits, targets, vocab_dim):
    """Mean softmax cross entropy (+ z-loss) over the positions whose target is not -1.

    The published masked mean: sum(weights * loss) / (sum(weights) + 1e-5).
    logits: float mtf [batch, length, vocab]; targets: int32 mtf [batch, length] (-1 = no loss).
    Returns (loss, token_count) as float32 mtf scalars.
    """
    weights = mtf.cast(mtf.not_equal(targets, -1), tf.float32)  # [batch, length]
    labels = mtf.maximum(targets, 0)  # -1 -> any valid id; its loss is weighted out
    per_token = softmax_cross_entropy(mtf.cast(logits, tf.float32), labels, vocab_dim,
                                      z_loss=Z_LOSS)  # [batch, length]
    count = mtf.reduce_sum(weights)
    return mtf.reduce_sum(per_token * weights) / (count + LOSS_DENOMINATOR_EPSILON), count
