"""Prediction without Estimator: `Predictor(model_dir)` -> forward / prefill / step / reorder_cache.

All programs of a Predictor (one per input shape) live in ONE tf.Graph and ONE Session and
share the model variables (`AUTO_REUSE`), so the checkpoint is restored once (plain
`tf.train.Saver` over the master variables, then `copy_masters_to_slices`) and a new input
shape only adds its ops. Incremental decoding keeps a fixed-length K/V cache of
`num_contexts` slots per layer in TF variables ([memory, batch, heads, head_dim]); `prefill`
writes the prompt's keys/values; each `step` attends to the filled slots only (a
leading-dim slice) plus its own key, then writes its key/value into the slot at the fed
position (StridedSliceAssign): no graph rebuild and no cache rewrite per token.
"""
import collections

import numpy as np

from gptsan import fileio, fingerprint, tensorio
from gptsan import mesh as meshlib
from gptsan.compat import config_pb2, mtf, session_config, tf
from gptsan.config import PARAMETERS_FILE, GPTSANConfig
from gptsan.errors import GPTSANError
from gptsan.modeling import MODEL_VARIABLE_PREFIXES, KVCache, build_model, variable_shapes
from gptsan.switch import GroupRouting, expert_capacity, split_into_groups

MAX_PROGRAMS = 8  # input shapes kept callable at once (each adds its ops to the graph)


class Predictor:
    """Runs a GPTSAN model directory (float32 by default) on a CPU/GPU mesh.

    Args:
      model_dir: directory with `parameters.json` and a TF checkpoint.
      mesh_shape: e.g. "batch:1,model:2" (default 1x1); the checkpoint may come from any mesh.
      dtype: activation dtype, float32 | bfloat16 | float16.
      devices: optional explicit device names (one per mesh position).
    Programs are built per input shape on demand (the batch is static in each program; a new
    batch size builds new programs, no padding). A vocabulary copy in the directory must be
    the one its parameters.json records (gptsan.fingerprint).
    """

    def __init__(self, model_dir, mesh_shape=None, dtype="float32", devices=None):
        self.model_dir = model_dir
        self.config = _load_config(model_dir)
        self.model_config = self.config.model
        self.checkpoint = _find_checkpoint(model_dir)
        _check_checkpoint(self.checkpoint, self.model_config)
        self.mesh_shape = meshlib.parse_mesh_shape(mesh_shape)
        self.model_config.validate_model_parallel(meshlib.model_parallel_size(self.mesh_shape))
        self.variable_dtype = meshlib.dtype_policy(dtype)
        if devices is None:
            devices = meshlib.cpu_devices_for(self.mesh_shape)
        self._mesh_impl = meshlib.make_mesh_impl(self.mesh_shape, devices=devices)
        self.max_length = self.model_config.num_contexts
        fingerprint.model_vocabulary(model_dir, self.config, required=False)

        self._graph = tf.Graph()
        self._session = tf.Session(graph=self._graph,
                                   config=session_config(meshlib.mesh_size(self.mesh_shape)))
        self._restored = False
        self._programs = collections.OrderedDict()
        self._caches = {}  # batch -> _Cache
        self._cache = None  # the active _Cache
        self.cache_length = 0
        self._cache_precontext = None  # [b] int32 of the active cache
        self._routing = None  # _RoutedGroup of a one-row prefill with routing_length

    # ------------------------------------------------------------------ public API
    def forward(self, input_ids, num_precontext=None, spout=None):
        """Full forward pass.

        Args:
          input_ids: int [b, s] token ids (s <= num_contexts).
          num_precontext: None, int or int [b]: prefix length in memory index (with a spout,
            the spout slot counts: 1 + prefix tokens).
          spout: None or float [b, num_spout] (or [num_spout], broadcast over the batch).
        Returns:
          {"logits": [b, s, vocab], "hidden_states": L x [b, s, d],
           "expert_index": n_switch x [b, s], "expert_kept": n_switch x [b, s] bool}
        """
        ids, precontext, spout = self._check_inputs(input_ids, num_precontext, spout)
        program = self._program(ids.shape[0], ids.shape[1], spout is not None, "forward")
        return program.run(ids, precontext, spout)

    def prefill(self, input_ids, num_precontext=None, spout=None, routing_length=None):
        """Forward pass that also (re)fills the K/V cache; returns the same dict as `forward`.

        routing_length (batch 1 only): route the Switch layers as the first tokens of a
        sequence of this many tokens (e.g. the published right-padded pass) would be routed:
        the same expert groups and capacity, so the prompt's outputs equal that pass's at a
        fraction of its cost (later tokens never take capacity from earlier ones). The
        following `step`s then continue that routing: a step's token counts against its
        expert's capacity in the group, as in the full padded pass. Without it a step's
        token always gets its expert.
        """
        ids, precontext, spout = self._check_inputs(input_ids, num_precontext, spout)
        slots = ids.shape[1] + (1 if spout is not None else 0)
        if slots > self.max_length:
            raise GPTSANError(f"prompt needs {slots} cache slots (tokens + spout) but the model "
                              f"has num_contexts={self.max_length}")
        batch = ids.shape[0]
        group_size = None
        if routing_length is not None:
            if batch != 1 or not ids.shape[1] <= routing_length <= self.max_length:
                raise GPTSANError(f"routing_length={routing_length} needs batch 1 and "
                                  f"{ids.shape[1]} <= routing_length <= {self.max_length}")
            group_size = split_into_groups(routing_length)[1]
        program = self._program(batch, ids.shape[1], spout is not None, "prefill", group_size)
        self._cache = self._cache_for(batch)
        result = program.run(ids, precontext, spout)
        self.cache_length = slots
        self._cache_precontext = precontext
        self._routing = None
        if group_size is not None and result.get("expert_index"):
            self._routing = _RoutedGroup(group_size, self.model_config.num_experts,
                                         np.stack(result["expert_index"])[:, 0],  # [n, s]
                                         slots - ids.shape[1])
        return result

    def step(self, token_ids):
        """Appends one token per row to the cache. token_ids: int [b].

        Returns {"logits": [b, vocab], "hidden_states": L x [b, d]}.
        """
        if self._cache is None or self.cache_length == 0:
            raise GPTSANError("step() needs a prefill() first")
        tokens = self._check_ids(np.asarray(token_ids).reshape(-1, 1), "token_ids")
        if tokens.shape[0] != self._cache.batch:
            raise GPTSANError(f"step() got {tokens.shape[0]} tokens but the cache holds "
                              f"{self._cache.batch} rows")
        if self.cache_length >= self.max_length:
            raise GPTSANError(f"the K/V cache is full: {self.cache_length} slots = "
                              f"num_contexts={self.max_length}")
        program = self._program(self._cache.batch, 1, False, "step")
        offsets, capacity = self._step_routing()
        out = program.run(tokens, self._cache_precontext, None, position=self.cache_length,
                          routing=(offsets, capacity))
        if self._routing is not None:
            self._routing.append(np.stack(out["expert_index"])[:, 0])  # [n, 1]
        self.cache_length += 1
        return {"logits": out["logits"][:, 0],
                "hidden_states": [h[:, 0] for h in out["hidden_states"]]}

    def rewind(self, length):
        """Keeps only the first `length` filled cache slots; later steps overwrite the rest."""
        if self._cache is None:
            raise GPTSANError("rewind() needs a prefill() first")
        if not 0 < length <= self.cache_length:
            raise GPTSANError(f"rewind length {length} is out of range 1..{self.cache_length}")
        self.cache_length = int(length)
        if self._routing is not None:
            self._routing.truncate(self.cache_length)

    def reorder_cache(self, indices):
        """Beam search: row i of the cache becomes old row indices[i]."""
        if self._cache is None:
            raise GPTSANError("reorder_cache() needs a prefill() first")
        indices = np.asarray(indices)
        batch = self._cache.batch
        if indices.shape != (batch,) or not np.issubdtype(indices.dtype, np.integer):
            raise GPTSANError(f"reorder_cache indices must be {batch} integers, got shape "
                              f"{indices.shape}")
        bad = indices[(indices < 0) | (indices >= batch)]
        if bad.size:
            raise GPTSANError(f"reorder_cache index {int(bad[0])} is out of range for a batch "
                              f"of {batch}")
        self._cache.reorder(indices.astype(np.int32), self.cache_length)
        self._cache_precontext = self._cache_precontext[indices]

    def close(self):
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _step_routing(self):
        """(offsets [n_switch, experts] float32, capacity) fed to a step's Switch layers."""
        config = self.model_config
        if self._routing is not None:
            return self._routing.offsets(self.cache_length)
        never_full = float(self.max_length * self._cache.batch + 1)
        return np.zeros([config.num_switch_layers, config.num_experts], np.float32), never_full

    # ------------------------------------------------------------------ input checks
    def _check_ids(self, input_ids, name="input_ids"):
        try:
            ids = np.asarray(input_ids)
        except (TypeError, ValueError):
            raise GPTSANError(f"{name} must be a 2-D array of token ids") from None
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise GPTSANError(f"{name} must have shape [batch, length] with both >= 1, "
                              f"got {list(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise GPTSANError(f"{name} must be integers, got dtype {ids.dtype}")
        vocab = self.model_config.num_vocabulary
        if ids.min() < 0 or ids.max() >= vocab:
            bad = np.argwhere((ids < 0) | (ids >= vocab))
            where = tuple(int(i) for i in bad[0])
            raise GPTSANError(f"token id {int(ids[where])} at {list(where)} is out of range: "
                              f"valid ids are 0..{vocab - 1} (num_vocabulary={vocab})")
        if ids.shape[1] > self.max_length:
            raise GPTSANError(f"sequence of {ids.shape[1]} tokens is longer than "
                              f"num_contexts={self.max_length}")
        return ids.astype(np.int32)

    def _check_inputs(self, input_ids, num_precontext, spout):
        ids = self._check_ids(input_ids)
        batch = ids.shape[0]
        if num_precontext is None:
            precontext = np.zeros([batch], np.int32)
        else:
            precontext = np.asarray(num_precontext)
            if precontext.ndim == 2 and precontext.shape[1] == 1:
                precontext = precontext[:, 0]  # published [batch, 1]
            if precontext.ndim == 0:
                precontext = np.full([batch], int(precontext))
            if precontext.shape != (batch,) or precontext.dtype.kind not in "iu":
                raise GPTSANError(f"num_precontext must be an integer or {batch} integers, "
                                  f"got shape {list(precontext.shape)}")
            bad = precontext[(precontext < 0) | (precontext > self.max_length)]
            if bad.size:
                raise GPTSANError(f"num_precontext {int(bad[0])} is out of range "
                                  f"0..{self.max_length}")
            precontext = precontext.astype(np.int32)
        if spout is not None:
            width = self.model_config.num_spout
            if not width:
                raise GPTSANError("a spout vector was given but the model has num_spout=0")
            spout = np.asarray(spout, dtype=np.float32)
            if spout.ndim == 1:
                spout = np.tile(spout[None], [batch, 1])
            if spout.ndim != 2 or spout.shape[1] != width:
                raise GPTSANError(f"spout has length {spout.shape[-1] if spout.ndim else 0} "
                                  f"but the model expects num_spout={width}")
            if spout.shape[0] != batch:
                raise GPTSANError(f"spout has {spout.shape[0]} rows for a batch of {batch}")
            if not np.all(np.isfinite(spout)):
                raise GPTSANError("spout contains NaN or infinite values")
        return ids, precontext, spout

    # ------------------------------------------------------------------ programs
    def _program(self, batch, length, spout, kind, group_size=None):
        key = (batch, length, spout, kind, group_size)
        program = self._programs.get(key)
        if program is None:
            if len(self._programs) >= MAX_PROGRAMS:
                self._programs.popitem(last=False)
            program = _Program(self, batch, length, spout, kind, group_size)
            self._programs[key] = program
        else:
            self._programs.move_to_end(key)
        return program

    def _cache_for(self, batch):
        if batch not in self._caches:
            self._caches[batch] = _Cache(self, batch)
        return self._caches[batch]

    def _restore(self, lowering):
        """Restores the master variables once; then fills this lowering's slices."""
        if not self._restored:
            masters = {v.op.name: v for v in self._graph.get_collection(
                tf.GraphKeys.GLOBAL_VARIABLES) if v.op.name.startswith(MODEL_VARIABLE_PREFIXES)}
            # one variable at a time, cast from the stored dtype (float16/bfloat16 checkpoints)
            tensorio.restore_variables(self._session, masters, self.checkpoint)
            self._restored = True
        self._session.run(lowering.copy_masters_to_slices())


class _RoutedGroup:
    """The Switch routing of a one-row cached sequence: which expert each token chose in each
    Switch layer, so a step can count the earlier tokens of its routing group.

    group_size: tokens per routing group (`switch.split_into_groups` of the routing length);
    choices: int [n_switch, tokens] expert chosen by each prefilled token (real or padding);
    spout_slots: cache slots before the first token (1 with a spout).
    """

    def __init__(self, group_size, num_experts, choices, spout_slots):
        self.group_size, self.num_experts = group_size, num_experts
        self.capacity = float(expert_capacity(group_size, num_experts, train=False))
        self.choices, self.spout_slots = np.asarray(choices, np.int64), spout_slots

    def truncate(self, cache_length):
        """Keeps the choices of the tokens before cache slot `cache_length`."""
        self.choices = self.choices[:, :cache_length - self.spout_slots]

    def append(self, step_choices):
        """Adds one token's choices ([n_switch, 1])."""
        self.choices = np.concatenate([self.choices, step_choices.astype(np.int64)], axis=1)

    def offsets(self, cache_length):
        """(tokens of the group before slot `cache_length` per layer and expert [n, E], C)."""
        token = cache_length - self.spout_slots
        earlier = self.choices[:, token - token % self.group_size:token]  # [n, <= S]
        counts = [np.bincount(row, minlength=self.num_experts) for row in earlier]
        return np.asarray(counts, np.float32), self.capacity


class _Cache:
    """Per-batch K/V cache variables: per layer K and V [num_contexts, batch, heads, head_dim]."""

    def __init__(self, predictor, batch):
        config = predictor.model_config
        self.batch = batch
        shape = [config.num_contexts, batch, config.num_header, config.head_dim]
        with predictor._graph.as_default(), tf.variable_scope(f"kv_cache_b{batch}"):
            self.keys = [tf.Variable(tf.zeros(shape), trainable=False, name=f"k{l}",
                                     collections=[]) for l in range(config.num_layers)]
            self.values = [tf.Variable(tf.zeros(shape), trainable=False, name=f"v{l}",
                                       collections=[]) for l in range(config.num_layers)]
            self._indices = tf.placeholder(tf.int32, [batch], name="reorder_indices")
            self._length = tf.placeholder(tf.int32, [], name="reorder_length")
            filled = slice(None, self._length)  # only the filled slots move (beam steps)
            self._reorder = tf.group([
                var[filled].assign(tf.gather(var[filled], self._indices, axis=1))
                for var in self.keys + self.values])
        predictor._session.run([v.initializer for v in self.keys + self.values])
        self._session = predictor._session

    def reorder(self, indices, length):
        """Row i of the first `length` slots becomes old row indices[i]."""
        if np.array_equal(indices, np.arange(self.batch)):
            return  # beams kept in place: nothing to copy
        self._session.run(self._reorder, {self._indices: indices, self._length: length})


class _Program:
    """One lowered mtf graph for a (batch, length, spout, kind) in the Predictor's tf.Graph.

    kind: "forward" (no cache), "prefill" (writes the cache's first slots) or "step"
    (one token at a fed cache position); group_size: Switch routing group size override.
    Feeds, in order: ids [b, s], num_precontext [b], then spout [b, num_spout] (if `spout`),
    and for a step its cache position and the `switch.GroupRouting` inputs.
    """

    def __init__(self, predictor, batch, length, spout, kind, group_size=None):
        cache = predictor._cache_for(batch) if kind != "forward" else None
        with predictor._graph.as_default(), tf.variable_scope(tf.get_variable_scope(),
                                                              reuse=tf.AUTO_REUSE):
            mesh = mtf.Mesh(mtf.Graph(), "gptsan")
            inputs = _ProgramInputs(mesh, predictor.model_config, batch, length, spout)
            past, group_routing = (inputs.cache_step(cache, predictor.variable_dtype)
                                   if kind == "step" else (None, None))
            output = build_model(
                predictor.model_config, mesh, inputs.ids, num_precontext=inputs.precontext,
                spout=inputs.spout, train=False, variable_dtype=predictor.variable_dtype,
                past=past, unsplit_model=meshlib.model_parallel_size(predictor.mesh_shape) == 1,
                routing_group_size=group_size, group_routing=group_routing)
            lowering = mtf.Lowering(mesh.graph, {mesh: predictor._mesh_impl})
            fetches = _fetches(lowering, output)
            updates = _cache_updates(lowering, output, cache, kind, inputs.position)
            predictor._restore(lowering)
        self._names = list(fetches)
        self._run = _callable(predictor._session, [fetches[n] for n in self._names], updates,
                              inputs.feeds)
        self._has_spout, self._has_routing = spout, group_routing is not None

    def run(self, ids, precontext, spout, position=None, routing=None):
        args = [ids, precontext]
        if self._has_spout:
            args.append(spout)
        if position is not None:
            args.append(np.int32(position))
        if self._has_routing:
            args += [routing[0], np.float32(routing[1])]
        result = dict(zip(self._names, self._run(*args)))
        for name in ("hidden_states", "expert_index", "expert_kept"):
            if name in result:
                result[name] = list(result[name])
        return result


class _ProgramInputs:
    """The placeholders of a program (`feeds`, in feed order) and their mtf imports."""

    def __init__(self, mesh, config, batch, length, spout):
        self.mesh, self.config = mesh, config
        self.batch_dim = mtf.Dimension(meshlib.BATCH, batch)
        ids = tf.placeholder(tf.int32, [batch, length], name="input_ids")
        precontext = tf.placeholder(tf.int32, [batch], name="num_precontext")
        self.feeds = [ids, precontext]
        self.ids = mtf.import_tf_tensor(
            mesh, ids, [self.batch_dim, mtf.Dimension(meshlib.LENGTH, length)])
        self.precontext = mtf.import_tf_tensor(mesh, precontext, [self.batch_dim])
        self.spout = self.position = None
        if spout:
            vectors = tf.placeholder(tf.float32, [batch, config.num_spout], name="spout")
            self.feeds.append(vectors)
            self.spout = mtf.import_tf_tensor(
                mesh, vectors, [self.batch_dim, mtf.Dimension(meshlib.SPOUT, config.num_spout)])

    def cache_step(self, cache, variable_dtype):
        """(KVCache over `cache` at a fed position, GroupRouting per Switch layer or None)."""
        config, mesh = self.config, self.mesh
        self.position = tf.placeholder(tf.int32, [], name="cache_position")
        self.feeds.append(self.position)
        kv_shape = [mtf.Dimension(meshlib.MEMORY, config.num_contexts), self.batch_dim,
                    mtf.Dimension(meshlib.HEADS, config.num_header),
                    mtf.Dimension(meshlib.HEAD_DIM, config.head_dim)]
        dtype = variable_dtype.activation_dtype

        def imported(variables):
            return [mtf.cast(mtf.import_tf_tensor(mesh, v, kv_shape), dtype) for v in variables]

        past = KVCache(keys=imported(cache.keys), values=imported(cache.values),
                       length=mtf.import_tf_tensor(mesh, self.position))
        return past, self._group_routing()

    def _group_routing(self):
        """Per Switch layer: the expert counts of the group's earlier tokens ([n_switch,
        experts] float32, fed) and the group's capacity (fed scalar)."""
        config, mesh = self.config, self.mesh
        if not config.num_switch_layers:
            return None
        offsets = tf.placeholder(tf.float32, [config.num_switch_layers, config.num_experts],
                                 name="expert_offsets")
        capacity = tf.placeholder(tf.float32, [], name="expert_capacity")
        self.feeds += [offsets, capacity]
        experts = mtf.Dimension(meshlib.EXPERTS, config.num_experts)
        capacity = mtf.import_tf_tensor(mesh, capacity)
        return [GroupRouting(mtf.import_tf_tensor(mesh, offsets[layer], [experts]), capacity)
                for layer in range(config.num_switch_layers)]


def _fetches(lowering, output):
    """{name: tf.Tensor}: logits, and per-layer outputs stacked ([layers, b, s, ...]; split
    in NumPy after the run)."""
    export = lowering.export_to_tf_tensor
    fetches = {"logits": export(output.logits),
               "hidden_states": tf.stack([tf.cast(export(h), tf.float32)
                                          for h in output.hidden_states])}
    if output.router_stats:
        fetches["expert_index"] = tf.stack([export(s.expert_index) for s in output.router_stats])
        fetches["expert_kept"] = tf.stack([tf.cast(export(s.kept), tf.bool)
                                           for s in output.router_stats])
    return fetches


def _cache_updates(lowering, output, cache, kind, position):
    """The ops writing a prefill's or a step's keys/values into the cache ([] otherwise).

    A step's write may land while its own cache read runs: harmless, the attention only uses
    cache slots < position (its own key comes separately).
    """
    updates = []
    if kind == "prefill":
        for layer, present in enumerate(output.presents):
            for var, tensor in zip((cache.keys[layer], cache.values[layer]), present):
                slots = tensor.shape.get_dim_by_name(meshlib.MEMORY).size
                updates.append(var[:slots].assign(
                    _export_ordered(lowering, tensor, _CACHE_ORDER)))
    elif kind == "step":
        for layer, new_kv in enumerate(output.new_keys_values):
            for var, tensor in zip((cache.keys[layer], cache.values[layer]), new_kv):
                updates.append(var[position:position + 1].assign(
                    _export_ordered(lowering, tensor, _CACHE_ORDER)))
    return [tf.group(updates)] if updates else []


def _callable(session, fetches, targets, feeds):
    """A function(*feed values) -> fetch values running one fixed step of `session`.

    `Session.make_callable` re-enters the generic `Session.run` whenever there are feeds
    (about 0.3 ms per call); the session's callable-from-options path (the pinned TF 1.x API
    that Keras' backend used) skips it, which matters for one-token decoding steps.
    """
    options = config_pb2.CallableOptions()
    options.feed.extend(t.name for t in feeds)
    options.fetch.extend(t.name for t in fetches)
    options.target.extend(op.name for op in targets)
    run = session._make_callable_from_options(options)  # pylint: disable=protected-access
    dtypes = [t.dtype.as_numpy_dtype for t in feeds]
    return lambda *values: run(*(np.asarray(v, d) for v, d in zip(values, dtypes)))


_CACHE_ORDER = (meshlib.MEMORY, meshlib.BATCH, meshlib.HEADS, meshlib.HEAD_DIM)


def _export_ordered(lowering, tensor, order):
    """float32 tf.Tensor of an mtf tensor with its dims in `order` (LENGTH counts as MEMORY)."""
    names = [meshlib.MEMORY if n == meshlib.LENGTH else n for n in tensor.shape.dimension_names]
    value = tf.cast(lowering.export_to_tf_tensor(tensor), tf.float32)
    perm = [names.index(name) for name in order]
    return value if perm == sorted(perm) else tf.transpose(value, perm)


# ---------------------------------------------------------------------- model directory
def _load_config(model_dir):
    if not fileio.isdir(model_dir):
        raise GPTSANError(f"model directory not found: {model_dir}")
    if not fileio.isfile(fileio.join(model_dir, PARAMETERS_FILE)):
        raise GPTSANError(f"{model_dir} has no {PARAMETERS_FILE}: not a GPTSAN model directory")
    return GPTSANConfig.from_json_file(model_dir)


def _find_checkpoint(model_dir):
    prefix = tf.train.latest_checkpoint(model_dir)
    if prefix is None or not fileio.exists(prefix + ".index"):
        raise GPTSANError(f"no TF checkpoint in {model_dir} (expected a 'checkpoint' file and "
                          "model.ckpt-<step>.index)")
    return prefix


def _check_checkpoint(prefix, config):
    """The checkpoint must hold every variable of `config` with the same shape."""
    try:
        stored = tf.train.NewCheckpointReader(prefix).get_variable_to_shape_map()
    except tf.errors.OpError as err:
        raise GPTSANError(f"cannot read checkpoint {prefix}: "
                          f"{err.message.splitlines()[0]}") from None
    for name, shape in variable_shapes(config).items():
        if name not in stored:
            raise GPTSANError(f"checkpoint {prefix} lacks {name} required by "
                              f"{PARAMETERS_FILE}; parameters.json does not match the checkpoint")
        if list(stored[name]) != list(shape):
            raise GPTSANError(f"checkpoint variable {name} has shape {list(stored[name])} but "
                              f"{PARAMETERS_FILE} implies {list(shape)}; parameters.json does "
                              "not match the checkpoint")
