"""How one model build runs on its mesh: the execution plan, chosen in one place.

The model code (`modeling.build_model`, `switch.switch_ffn`) takes an `ExecutionPlan` and
calls its objects; it does not know which of them runs. `execution_plan` picks them from the
mesh layout and the mode:

| mode, mesh | products | experts (S > C) | attention |
|---|---|---|---|
| infer, model split or unknown | `SliceProducts` (einsum over heads) | `OneHotDispatch` | stored |
| infer, model size 1 | `SliceProducts` | `RoutedExperts` | stored |
| train, one slice, not TPU | `SliceProducts`, differentiable | `RoutedExperts`, same | recomputed |
| train, any other mesh | `EinsumProducts` | `OneHotDispatch` | recomputed |

Inference also routes tiny groups (2 S <= E) by `TokenChoice`; every mode runs groups that
drop nothing (S <= C) through `EveryExpert` (`experts.ByGroupShape`).
"""
import dataclasses

from gptsan import mesh as meshlib
from gptsan.attention import RecomputedAttention, StoredAttention
from gptsan.experts import ByGroupShape, OneHotDispatch, RoutedExperts, TokenChoice
from gptsan.layers import EinsumProducts, SliceProducts

TRAIN, INFER = "train", "infer"


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """The objects one build runs with (see the module docstring for the choices)."""
    training: bool  # model semantics (published): router jitter, training capacity factor
    products: object  # dense, tied_logits, gather_rows: `layers.EinsumProducts` / `SliceProducts`
    experts: object  # (tokens, routing, w_in, w_out) -> [G, S, D]: `experts.ByGroupShape`
    attention: object  # (q, keys, values, mask, bthk) -> context: `attention.*Attention`
    recompute_ext_layers: bool = False  # training: extra layers recompute in the backward pass


def execution_plan(mesh_shape=None, mode=INFER, tpu=False, recompute_ext_layers=False):
    """The plan of a build on `mesh_shape` (None: any layout) in `mode` (TRAIN or INFER).

    tpu: training on TPU keeps the mtf einsums even on one core.
    recompute_ext_layers: training (fine-tuning): each extra dense layer keeps only its input
    for the backward pass and recomputes the rest there (`mtf.recompute_grad`), so activation
    memory stays about one layer's whatever the number of added layers.
    """
    if mode not in (TRAIN, INFER):
        raise ValueError(f"mode must be {TRAIN!r} or {INFER!r}, got {mode!r}")
    split = _split_dims(mesh_shape)
    experts_whole = meshlib.EXPERTS not in split
    if mode == INFER:
        general = RoutedExperts() if experts_whole else OneHotDispatch()
        return ExecutionPlan(False, SliceProducts(split=split), ByGroupShape(
            general, few_tokens=TokenChoice()), StoredAttention())
    if mesh_shape is not None and meshlib.mesh_size(mesh_shape) == 1 and not tpu:
        products = SliceProducts(differentiable=True)
        general = RoutedExperts(differentiable=True)
    else:
        products, general = EinsumProducts(), OneHotDispatch()
    return ExecutionPlan(True, products, ByGroupShape(general), RecomputedAttention(),
                         recompute_ext_layers=recompute_ext_layers)


def _split_dims(mesh_shape):
    """Names of the tensor dims the layout rules map to a mesh dim of size > 1 (all ruled
    dims when the mesh is not known)."""
    sizes = None
    if mesh_shape is not None:
        shape = meshlib.parse_mesh_shape(mesh_shape)
        sizes = dict(zip(shape.dimension_names, shape.to_integer_list))
    return frozenset(name for name, axis in meshlib.LAYOUT_RULES
                     if sizes is None or sizes.get(axis, 1) > 1)
