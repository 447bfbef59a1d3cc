"""TFRecord training data: the example schema, writing shards, reading them back, and the input_fn.

Schema (docs/ARCHITECTURE.md "Training data"; the published run_training.py feature names):
    x          int64[num_context]  tokens
    y          int64[num_context]  targets, -1 = no loss
    i          int64[1]            document / class id (drives the spout)
    num_input  int64[1]            bidirectional prefix length (num_precontext)
`parse_example` casts every feature to int32, as the published input pipeline does.
"""
import glob
import os

import numpy as np
from google.protobuf.message import DecodeError

from gptsan.compat import tf
from gptsan.errors import GPTSANError
from gptsan.fingerprint import is_sidecar

X, Y, CLASS_ID, NUM_INPUT = "x", "y", "i", "num_input"  # feature names
SHARD_SUFFIX = ".tfrecord"
SHARD_DIGITS = 4  # published naming: <mode>_0000.tfrecord
SHUFFLE_BUFFER = 1000  # examples held by the training shuffle
INTERLEAVE_FILES = 4  # shards read in parallel when training


def feature_spec(num_context):
    """tf.io parsing spec of one example."""
    return {
        X: tf.io.FixedLenFeature([num_context], tf.int64),
        Y: tf.io.FixedLenFeature([num_context], tf.int64),
        CLASS_ID: tf.io.FixedLenFeature([1], tf.int64),
        NUM_INPUT: tf.io.FixedLenFeature([1], tf.int64),
    }


def serialize_example(x, y, class_id, num_input):
    """One example -> serialized `tf.train.Example` bytes."""
    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(
            value=np.asarray(values, dtype=np.int64).tolist()))

    features = {X: ints(x), Y: ints(y), CLASS_ID: ints([class_id]), NUM_INPUT: ints([num_input])}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def decode_example(serialized):
    """Serialized example -> dict of int64 numpy arrays (pure protobuf, no session)."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    missing = [name for name in (X, Y, CLASS_ID, NUM_INPUT) if name not in feature]
    if missing:
        raise GPTSANError(f"example lacks the feature(s) {', '.join(missing)}: not GPTSAN "
                          "training data")
    return {name: np.array(feature[name].int64_list.value, dtype=np.int64)
            for name in (X, Y, CLASS_ID, NUM_INPUT)}


def parse_example(serialized, num_context):
    """Graph op: a scalar string tensor -> dict of int32 tensors x, y [ctx], i, num_input [1]."""
    parsed = tf.io.parse_single_example(serialized, feature_spec(num_context))
    return {name: tf.cast(value, tf.int32) for name, value in parsed.items()}


def iterate_records(path):
    """Yields the raw records of one TFRecord file; a damaged file -> GPTSANError."""
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise GPTSANError(f"no such TFRecord file: {path}")
    try:
        for record in tf.compat.v1.io.tf_record_iterator(path):
            yield record
    except tf.errors.OpError as err:
        raise GPTSANError(f"{path} is not a readable TFRecord file: not a valid TFRecord "
                          f"({err.message.splitlines()[0]})") from None


def read_examples(path, start=0, count=None):
    """Yields (index, example dict) for examples start .. start+count-1 of a TFRecord file."""
    for index, record in enumerate(iterate_records(path)):
        if index < start:
            continue
        if count is not None and index >= start + count:
            return
        try:
            yield index, decode_example(record)
        except DecodeError:
            raise GPTSANError(f"{path} holds records that are not tf.train.Examples (record "
                              f"{index} is not a tf.train.Example); make the input with "
                              "scripts/make_tfrecord.py") from None


def find_input_files(file_patterns):
    """Comma-separated string or list of globs (local or gs://) -> sorted, de-duplicated files:
    not directories, not the <prefix>.vocabulary.json sidecars next to the shards."""
    if isinstance(file_patterns, str):
        file_patterns = file_patterns.split(",")
    patterns = [p.strip() for p in file_patterns if p.strip()]
    files = {f for pattern in patterns for f in tf.io.gfile.glob(pattern)
             if not tf.io.gfile.isdir(f) and not is_sidecar(f)}
    if not files:
        raise GPTSANError(f"no training files: no input files matched {','.join(patterns)!r}")
    return sorted(files)


def first_tokens(files):
    """(path, `x` tokens) of the first example in `files` (empty files are skipped)."""
    for path in files:
        for _, example in read_examples(path, count=1):
            return path, example[X]
    raise GPTSANError(f"the input files hold no examples ({files[0]} ...): they are empty, "
                      "truncated or not TFRecord files; make them with scripts/make_tfrecord.py")


def check_input_files(file_patterns, num_context):
    """The TFRecord files of `file_patterns`, checked once where they enter (a CLI or
    `input_fn_builder`): they exist, hold tf.train.Examples, and the first has `num_context`
    tokens. Returns the sorted files."""
    files = find_input_files(file_patterns)
    path, tokens = first_tokens(files)
    if len(tokens) != num_context:
        raise GPTSANError(f"{path} holds examples of {len(tokens)} tokens but the model has "
                          f"num_contexts={num_context}; remake the data with "
                          f"scripts/make_tfrecord.py --num_context {num_context}")
    return files


def check_token_ids(files, num_vocabulary):
    """The first example's token ids must be < num_vocabulary (the model's vocabulary)."""
    largest = int(max(first_tokens(files)[1], default=0))
    if largest >= num_vocabulary:
        raise GPTSANError(f"the TFRecords hold token id {largest} but the model has "
                          f"num_vocabulary={num_vocabulary}; make them with the vocabulary the "
                          "model uses")


def input_fn_builder(file_patterns, num_context, batch_size, is_training, seed=None):
    """Returns `input_fn(params)` for Estimator/TPUEstimator over GPTSAN TFRecords.

    Batches are static ([batch_size, num_context], drop_remainder=True); TPUEstimator's
    params["batch_size"] (per-shard batch) wins over `batch_size`. Training reads the shards in
    a seeded random order, interleaved, shuffled and repeated forever; evaluation reads them once
    in order. The files are checked here (`check_input_files`), before the Estimator starts.
    """
    return make_input_fn(check_input_files(file_patterns, num_context), num_context, batch_size,
                         is_training, seed)


def make_input_fn(files, num_context, batch_size, is_training, seed=None):
    """`input_fn_builder` over `files` already checked by `check_input_files`."""

    def input_fn(params=None):
        size = (params or {}).get("batch_size", batch_size)
        if is_training:
            names = tf.data.Dataset.from_tensor_slices(files)
            names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
            data = names.interleave(tf.data.TFRecordDataset,
                                    cycle_length=min(INTERLEAVE_FILES, len(files)),
                                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            data = data.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        else:
            data = tf.data.TFRecordDataset(files)
        data = data.map(lambda record: parse_example(record, num_context),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        data = data.batch(size, drop_remainder=True)
        return data.prefetch(tf.data.AUTOTUNE)

    return input_fn


# ---------------------------------------------------------------------------------------------
# Writing shards

def shard_path(prefix, index):
    return f"{prefix}_{index:0{SHARD_DIGITS}d}{SHARD_SUFFIX}"


def existing_shards(prefix):
    """Shards a previous run left under this output prefix."""
    pattern = glob.escape(prefix) + "_" + "[0-9]" * SHARD_DIGITS + SHARD_SUFFIX
    return sorted(glob.glob(pattern))


class ShardWriter:
    """Writes examples into `<prefix>_0000.tfrecord`, ... with `per_shard` examples each.

    Every shard is written to a temporary name; `commit()` renames them all at once (and, with
    `force`, removes older shards of the prefix that were not rewritten); `abort()` deletes them.
    """

    def __init__(self, prefix, per_shard, force=False):
        if per_shard <= 0:
            raise GPTSANError(f"--data_per_file must be > 0, got {per_shard}")
        old = existing_shards(prefix)
        if old and not force:
            raise GPTSANError(f"{old[0]} already exists; use --force to overwrite "
                              "or choose another --output_prefix")
        folder = os.path.dirname(prefix)
        if folder and not os.path.isdir(folder):
            raise GPTSANError(f"output folder {folder} does not exist")
        self.prefix, self.per_shard, self.force = prefix, per_shard, force
        self.temp_paths, self.count, self._writer = [], 0, None

    def write(self, serialized):
        if self.count % self.per_shard == 0:
            self._close()
            temp = shard_path(self.prefix, len(self.temp_paths)) + f".tmp{os.getpid()}"
            self.temp_paths.append(temp)
            self._writer = tf.io.TFRecordWriter(temp)
        self._writer.write(serialized)
        self.count += 1

    def _close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self):
        """Renames the temporary shards to their final names; returns the final paths."""
        self._close()
        stale = set(existing_shards(self.prefix))
        final = []
        for index, temp in enumerate(self.temp_paths):
            path = shard_path(self.prefix, index)
            os.replace(temp, path)
            stale.discard(path)
            final.append(path)
        for path in sorted(stale):
            os.remove(path)
        self.temp_paths = []
        return final

    def abort(self):
        self._close()
        for temp in self.temp_paths:
            if os.path.exists(temp):
                os.remove(temp)
        self.temp_paths = []
