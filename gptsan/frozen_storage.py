"""Frozen backbone storage for fine-tuning: frozen variables kept narrow (bfloat16) and
their float32 casts made one layer at a time."""
from gptsan.compat import tf


FROZEN_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}  # --frozen_dtype choices


def frozen_storage_getter(frozen_names, dtype):
    """TF custom getter storing the variables named in `frozen_names` as `dtype`.

    mtf then reads such a variable through a cast to the activation dtype (`Variable.lower`);
    the optimizer never sees it (it is frozen), and the checkpoint holds it as `dtype`.
    """
    frozen = set(frozen_names)

    def storage_getter(getter, name, *args, **kwargs):
        if dtype != tf.float32 and name in frozen:
            kwargs["dtype"] = dtype
        return getter(name, *args, **kwargs)

    return storage_getter


def delay_casts(frozen, lowering):
    """Makes each cast of a narrow frozen weight wait for the activations it meets.

    A cast depends only on its variable, so TensorFlow would run every one at the start of a
    step and hold a float32 copy of the whole frozen backbone at once. Each cast gets control
    inputs from the activations that the ops computed from its weight alone (reshapes, expert
    slices, ...) meet -- only those that do not themselves depend on the cast, so no cycle is
    made -- and the float32 copies then live about one layer at a time.
    """
    graph = tf.get_default_graph()
    order = {op: k for k, op in enumerate(graph.get_operations())}  # creation order: topological
    edges = []  # decided on the unchanged graph, then added
    for variable in frozen:
        for cast in lowering.tensors[variable.outputs[0]].tensor_list:
            if cast.op.type != "Cast":
                continue
            waits = _activations_met(cast.op)
            if waits:
                after = _descendants(cast.op, max(order[op] for op in waits), order)
                edges.append((cast.op, [op for op in waits if op not in after]))
    for cast_op, waits in edges:
        if waits:
            cast_op._add_control_inputs(waits)  # noqa: SLF001 - the TF1 way to add an edge


def _activations_met(op):
    """Ops feeding the first consumers of `op`'s weight-only descendants that are not derived
    from the weight (nor constants): the activations the weight is combined with."""
    derived, stack, met = {op}, [op], set()
    while stack:
        for consumer in {c for out in stack.pop().outputs for c in out.consumers()}:
            others = [t.op for t in consumer.inputs
                      if t.op not in derived and t.op.type != "Const"]
            if others:
                met.update(others)
            elif consumer not in derived:
                derived.add(consumer)
                stack.append(consumer)
    return met - derived


def _descendants(op, limit, order):
    """Ops reachable from `op` whose creation index is <= `limit` (bounded search)."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for nxt in [c for out in current.outputs for c in out.consumers()] + \
                list(current._control_outputs):  # noqa: SLF001
            if nxt not in seen and order.get(nxt, limit + 1) <= limit:
                seen.add(nxt)
                stack.append(nxt)
    return seen
