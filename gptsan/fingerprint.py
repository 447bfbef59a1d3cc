"""Which vocabulary goes with which model: fingerprints of the vocabulary and the emoji table.

This project's `ja-swe36k.txt` and the published one share a name and a size, yet only 288 of
their 36,000 ids agree (the control and placeholder tokens): weights paired with the other file
write nonsense and nothing else would notice. So (docs/ARCHITECTURE.md, "Vocabulary identity"):

* every model directory the project writes records the fingerprints (and the file names) of its
  vocabulary and emoji table in `parameters.json`, section "vocabulary_params"
  (gptsan.config.VocabularyParams); an HF directory written by the converter records the same in
  `config.json` (HF_RECORD_KEY); TFRecord shards get `<prefix>.vocabulary.json` next to them;
* loading, training, --init_checkpoint, conversion and the TFRecord tools compare fingerprints and
  refuse a mismatch with one line naming both files;
* a directory that records nothing (a published checkpoint) uses its own copy (or the files
  given by flags, which must then equal its copy); without one it is an error saying which
  vocabulary it needs. This project's own 36k files are refused there; the published vocabulary
  is recognised by its fingerprint (constants below) and named when it is the one in use.

What a fingerprint covers, so that every copy of one vocabulary has the same one:
* vocabulary: SHA-256 of its entries joined by "\\n" in UTF-8, i.e. the file's bytes without one
  final newline (ja-swe files have none; HF's `save_vocabulary`, which wrote the HF upload's
  `vocab.txt`, ends every entry with one). Copies in model directories are written this way.
* emoji table: SHA-256 of `json.dumps(table, ensure_ascii=False, separators=(",", ":"))` in UTF-8:
  the JSON value in its own key order, whatever the file's spacing or \\u escapes (the order
  counts: emoji are replaced in table order).
"""
import dataclasses
import hashlib
import json
import os
import re
import sys

from gptsan import fileio
from gptsan.config import (EMOJI_FILE, PARAMETERS_FILE, VOCAB_FILE, GPTSANConfig,
                           VocabularyParams)
from gptsan.errors import GPTSANError

# The published GPTSAN vocabulary (MIT, (c) tanreinama): ja-swe36k.txt + emoji.json of
# github.com/tanreinama/GPTSAN (= vocab.txt + emoji.json of the HF upload), measured on the
# copies in ../shared/reference (tests/test_fingerprint.py checks them when present).
PUBLISHED_VOCAB_SHA256 = "039a696c4f53e7902060f9240ecb9ff10e6e831ca6429faff1eaa4f2a16c45dd"
PUBLISHED_EMOJI_SHA256 = "49fdb825273798b2fcb2e8c4e765d3a5d19e0aefe1ffa6120d5c1267876a6f0e"
# This repository's own ja-swe36k.txt / emoji.json (built by `make vocab`; a test keeps these
# equal to the committed files).
PROJECT_VOCAB_SHA256 = "e3cec17db832ae4a60889acb5698e4c78f09fe590990a7e7caf7cf7afe5a62be"
PROJECT_EMOJI_SHA256 = "57bc608dce85b2776a3f9e298b4a41925d74d00b58c8f176484c4c9c91be772d"
PUBLISHED_NAME = "the published GPTSAN ja-swe36k vocabulary"
PROJECT_NAME = "this project's own ja-swe36k vocabulary, not the published one"
PUBLISHED_SOURCE = ("ja-swe36k.txt + emoji.json of github.com/tanreinama/GPTSAN, or vocab.txt + "
                    "emoji.json of the HF upload Tanrei/GPTSAN-japanese")
PUBLISHED_SIZE = 36000  # entries of the published vocabulary
HF_RECORD_KEY = "gptsan_vocabulary_params"  # the record inside an HF config.json
RECORDS_SUFFIX = ".vocabulary.json"  # <prefix>.vocabulary.json next to <prefix>_0000.tfrecord
_SHARD_NAME = re.compile(r"^(.*)_[0-9]+\.tfrecord$")  # gptsan.records.shard_path names
_RESERVED_NAMES = (PARAMETERS_FILE, "checkpoint")  # names a vocabulary copy must not take
SHORT = 12  # hex digits of a fingerprint shown in messages


class VocabularyMismatch(GPTSANError):
    """A vocabulary or emoji table that is not the one a model or TFRecords were made with."""


# ----------------------------------------------------------------------------------- computing
def vocabulary_text(path):
    """The vocabulary's entries joined by "\\n" (the file without one final newline)."""
    try:
        text = fileio.read_text(path)
    except FileNotFoundError:
        raise GPTSANError(f"vocabulary file not found: {path}") from None
    except UnicodeDecodeError:
        raise GPTSANError(f"vocabulary file {path} is not UTF-8 text") from None
    return text[:-1] if text.endswith("\n") else text


def emoji_text(path):
    """The emoji table as compact JSON in its own key order (what its fingerprint covers)."""
    table = fileio.read_json(path, "emoji file")
    if not isinstance(table, dict) or not isinstance(table.get("emoji"), dict):
        raise GPTSANError(f"{path} is not an emoji table (no 'emoji' object)")
    return json.dumps(table, ensure_ascii=False, separators=(",", ":"))


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def short(digest):
    return digest[:SHORT]


def vocabulary_name(vocab_sha256, path, entries):
    """Which vocabulary a fingerprint is, for people."""
    if vocab_sha256 == PUBLISHED_VOCAB_SHA256:
        return PUBLISHED_NAME
    if vocab_sha256 == PROJECT_VOCAB_SHA256:
        return PROJECT_NAME
    return f"{os.path.basename(str(path))}, {entries} entries"


@dataclasses.dataclass(frozen=True)
class VocabularyFiles:
    """A vocabulary file and its emoji table, with their fingerprints."""
    vocab: str  # path of the vocabulary file
    emoji: str  # path of the emoji table
    vocab_sha256: str
    emoji_sha256: str
    entries: int  # ids of the vocabulary
    note: str = ""  # for the user: the published vocabulary is in use / nothing to check against

    @classmethod
    def of(cls, vocab, emoji):
        text = vocabulary_text(vocab)
        return cls(vocab, emoji, sha256(text), sha256(emoji_text(emoji)), text.count("\n") + 1)

    @property
    def name(self):
        return vocabulary_name(self.vocab_sha256, self.vocab, self.entries)

    @property
    def is_published(self):
        return self.vocab_sha256 == PUBLISHED_VOCAB_SHA256

    def record(self, keep=None, name=None):
        """The VocabularyParams a model directory records for these files.

        File names: `keep`'s (an existing record), else `ja-swe36k.txt` / `emoji.json` for the
        published files, else the source files' own names.
        """
        if keep is not None:
            vocab_file, emoji_file = keep.vocab_file, keep.emoji_file
            name = name or keep.vocab_name
        else:
            vocab_file = VOCAB_FILE if self.is_published else os.path.basename(self.vocab)
            emoji_file = (EMOJI_FILE if self.emoji_sha256 == PUBLISHED_EMOJI_SHA256
                          else os.path.basename(self.emoji))
        if vocab_file == emoji_file or {vocab_file, emoji_file} & set(_RESERVED_NAMES):
            raise GPTSANError(f"cannot copy {self.vocab} and {self.emoji} into a model directory "
                              f"as {vocab_file} / {emoji_file}: rename them")
        return VocabularyParams(vocab_file=vocab_file, emoji_file=emoji_file,
                                vocab_sha256=self.vocab_sha256, emoji_sha256=self.emoji_sha256,
                                vocab_name=name or self.name)

    def model_dir_files(self, record):
        """{name in the model directory: bytes or source path}: the copies a directory holds
        (the vocabulary without a final newline: one entry per id for `read().split('\\n')`)."""
        return {record.vocab_file: vocabulary_text(self.vocab).encode("utf-8"),
                record.emoji_file: self.emoji}


def announce(files):
    """Prints the files' note (if any) to stderr: the CLIs say which vocabulary is in use."""
    if files is not None and files.note:
        print(files.note, file=sys.stderr)


# ----------------------------------------------------------------------------------- comparing
MODEL_REASON = "a model works only with the vocabulary it was trained with"
RECORDS_REASON = "TFRecords go only with the vocabulary they were made with"


def check_recorded(files, record, owner, recorded=None, reason=MODEL_REASON):
    """`files` must be the vocabulary and emoji table `record` holds. `owner`: the file holding
    the record; `recorded`: (vocabulary, emoji) paths of the recorded files, named in the error
    (default: the record's file names)."""
    recorded = recorded or (record.vocab_file, record.emoji_file)

    def expected(path, given):  # a changed copy in place: name the record only
        return "the one" if path == given else path

    if files.vocab_sha256 != record.vocab_sha256:
        raise VocabularyMismatch(
            f"vocabulary {files.vocab} ({files.name}, sha256 {short(files.vocab_sha256)}) is not "
            f"{expected(recorded[0], files.vocab)} ({record.vocab_name}, sha256 "
            f"{short(record.vocab_sha256)}) recorded in {owner}; {reason}")
    if files.emoji_sha256 != record.emoji_sha256:
        raise VocabularyMismatch(
            f"emoji table {files.emoji} (sha256 {short(files.emoji_sha256)}) is not "
            f"{expected(recorded[1], files.emoji)} (sha256 {short(record.emoji_sha256)}) "
            f"recorded in {owner}; {reason}")


def check_same(files, own, where):
    """Files given by flags must equal the copies `own` that the directory `where` holds."""
    for what, path, digest, own_path, own_digest in (
            ("vocabulary", files.vocab, files.vocab_sha256, own.vocab, own.vocab_sha256),
            ("emoji table", files.emoji, files.emoji_sha256, own.emoji, own.emoji_sha256)):
        if digest != own_digest:
            raise VocabularyMismatch(
                f"{what} {path} (sha256 {short(digest)}) differs from {own_path} (sha256 "
                f"{short(own_digest)}), the copy in {where}; a model works only with the "
                "vocabulary it was trained with")


def check_unrecorded(files, where):
    """Files used with a directory that records no fingerprint (a published checkpoint):
    refuses this project's own 36k files; returns `files` with a note saying what is in use."""
    for path, digest, project in ((files.vocab, files.vocab_sha256, PROJECT_VOCAB_SHA256),
                                  (files.emoji, files.emoji_sha256, PROJECT_EMOJI_SHA256)):
        if digest == project:
            raise VocabularyMismatch(
                f"{where} records no vocabulary fingerprint, so it is taken for a published "
                f"GPTSAN checkpoint, which needs the published vocabulary; {path} belongs to "
                f"{PROJECT_NAME}: use {PUBLISHED_SOURCE}")
    if files.is_published:
        note = _published_note(where, files)
    else:
        note = (f"note: {where} records no vocabulary fingerprint; {files.vocab} ({files.name}, "
                f"sha256 {short(files.vocab_sha256)}) cannot be checked against it")
    return dataclasses.replace(files, note=note)


def _published_note(where, files):
    return f"note: {where}: using {PUBLISHED_NAME} ({files.vocab})" if files.is_published else ""


# ------------------------------------------------------------------------ model directories
def resolve(where, record, own_vocab, own_emoji, vocabulary=None, emoji=None, required=True,
            model=None, owner=None):
    """The checked VocabularyFiles to use with directory `where`.

    record: what the directory records (None: nothing, a published checkpoint);
    own_vocab / own_emoji: paths of the directory's copies; vocabulary / emoji: files given by
    flags instead (they must be what the directory records, or equal its copies); model: the
    ModelConfig, whose num_vocabulary the vocabulary must have.
    Returns None when nothing is found and not `required` (weights-only directories).
    """
    owner = owner or where
    vocab, emoji_path = vocabulary or own_vocab, emoji or own_emoji
    if not required and not any(map(fileio.isfile, (vocab, emoji_path))):
        return None
    for what, path, own, flag in (("vocabulary", vocab, own_vocab, "--vocabulary"),
                                  ("emoji table", emoji_path, own_emoji, "--emoji")):
        if not fileio.isfile(path):
            raise GPTSANError(_missing(where, record, what, path, path == own, flag,
                                       model and model.num_vocabulary))
    files = VocabularyFiles.of(vocab, emoji_path)
    if model is not None:
        model.validate_vocabulary(files.entries, source=files.vocab)
    if record is not None:
        check_recorded(files, record, owner, (own_vocab, own_emoji))
        return dataclasses.replace(files, note=_published_note(where, files))
    if (vocab, emoji_path) != (own_vocab, own_emoji) and fileio.isfile(own_vocab) \
            and fileio.isfile(own_emoji):
        check_same(files, VocabularyFiles.of(own_vocab, own_emoji), where)
    return check_unrecorded(files, where)


def _missing(where, record, what, path, is_copy, flag, num_vocabulary):
    if not is_copy:
        return f"{what} file not found: {path}"
    if record is not None:
        return (f"{path} not found: {where} goes with {record.vocab_name} (sha256 "
                f"{short(record.vocab_sha256)}, its {what} {os.path.basename(path)}); put the "
                f"copy back or pass {flag}")
    if num_vocabulary in (None, PUBLISHED_SIZE):
        return (f"{where} has no {os.path.basename(path)} and records no vocabulary "
                f"fingerprint: a published GPTSAN checkpoint needs the published vocabulary "
                f"({PUBLISHED_SOURCE}); copy it into {where} or pass {flag}")
    return (f"{where} has no {os.path.basename(path)} and records no vocabulary fingerprint: it "
            f"needs the {num_vocabulary}-entry vocabulary it was trained with; copy it into "
            f"{where} or pass {flag}")


def model_vocabulary(model_dir, config=None, vocabulary=None, emoji=None, required=True):
    """The checked VocabularyFiles of a GPTSAN model directory (`config`: its parameters.json,
    read when not given); `vocabulary` / `emoji` replace its copies. None when the directory
    has no copies and records nothing, and not `required`."""
    config = config or GPTSANConfig.from_json_file(model_dir)
    record = config.vocabulary
    own_vocab = fileio.join(model_dir, record.vocab_file if record else VOCAB_FILE)
    own_emoji = fileio.join(model_dir, record.emoji_file if record else EMOJI_FILE)
    return resolve(model_dir, record, own_vocab, own_emoji, vocabulary, emoji, required,
                   config.model, fileio.join(model_dir, PARAMETERS_FILE))


def hf_record(hf_config, source):
    """The VocabularyParams an HF config.json holds (None when it holds none)."""
    data = hf_config.get(HF_RECORD_KEY)
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {f.name for f in
                                                   dataclasses.fields(VocabularyParams)}:
        raise GPTSANError(f"{source}: {HF_RECORD_KEY} is not a GPTSAN vocabulary record")
    return VocabularyParams(**data)


def _model_dir(path):
    """`path` if it is a model directory (has parameters.json), else None."""
    return path if path and fileio.isfile(fileio.join(path, PARAMETERS_FILE)) else None


def _init_dir(path):
    """The model directory of --init_checkpoint (a directory, or a checkpoint prefix in one)."""
    if path and not fileio.isdir(path) and fileio.exists(path + ".index"):
        path = fileio.dirname(path)
    return _model_dir(path)


def training_vocabulary(config, vocabulary=None, emoji=None, model_dir=None,
                        init_checkpoint=None, record_files=(), parameter_file=None):
    """(VocabularyFiles, VocabularyParams for the output directory) of a run_train.py run.

    The vocabulary is --vocabulary / --emoji (emoji default: emoji.json next to the
    vocabulary), else the output directory's copy (a resumed run), else the --init_checkpoint
    directory's, else the files the TFRecords were made with. It must match every one of those
    that exists and the record of the parameter file.
    """
    resumed = _model_dir(model_dir)
    dirs = [d for d in (resumed, _init_dir(init_checkpoint)) if d]
    data, unrecorded = records_vocabulary(record_files)
    if vocabulary:
        files = VocabularyFiles.of(vocabulary, emoji or _emoji_next_to(vocabulary))
    else:
        found = (model_vocabulary(d, emoji=emoji, required=False) for d in dirs)
        files = next((f for f in found if f is not None), None)
        if files is None and data is not None:
            files = VocabularyFiles.of(data["vocabulary"], emoji or data["emoji"])
        if files is None:
            raise GPTSANError("no vocabulary: pass --vocabulary (and --emoji), the files the "
                              "TFRecords were made with")
    notes = [model_vocabulary(d, vocabulary=files.vocab, emoji=files.emoji).note for d in dirs]
    if config.vocabulary is not None:
        check_recorded(files, config.vocabulary, parameter_file or "the parameter file")
    if data is not None:
        check_records(files, data)
    if unrecorded:
        notes.append(f"note: {unrecorded[0]}{' and others' if len(unrecorded) > 1 else ''} "
                     f"carry no vocabulary fingerprint (no {RECORDS_SUFFIX} next to them); "
                     f"taken to be made with {files.vocab}")
    # the output directory's record when resuming, else the init checkpoint's (same fingerprints)
    kept = [GPTSANConfig.from_json_file(d).vocabulary for d in dirs] + [config.vocabulary]
    record = files.record(keep=next((r for r in kept if r is not None), None))
    return dataclasses.replace(files, note="\n".join(n for n in notes if n)), record


def _emoji_next_to(vocabulary):
    return fileio.join(fileio.dirname(vocabulary), EMOJI_FILE)


def copy_vocabulary(model_dir, record, vocabulary, emoji):
    """Writes the vocabulary / emoji copies `record` names into `model_dir` (atomic; an existing
    copy is kept: a resumed run already checked it)."""
    files = VocabularyFiles.of(vocabulary, emoji)
    for name, content in files.model_dir_files(record).items():
        target = fileio.join(model_dir, name)
        if fileio.exists(target):
            continue
        if isinstance(content, bytes):
            fileio.write_text_atomic(target, content.decode("utf-8"))
        else:
            fileio.copy_file_atomic(content, target)


# ---------------------------------------------------------------------------------- TFRecords
_RECORD_KEYS = ("vocab_file", "emoji_file", "vocab_sha256", "emoji_sha256", "vocab_name")


def records_sidecar(shard):
    """`<prefix>.vocabulary.json` of a `<prefix>_NNNN.tfrecord` shard (None: another name)."""
    match = _SHARD_NAME.match(str(shard))
    return match.group(1) + RECORDS_SUFFIX if match else None


def is_sidecar(path):
    return str(path).endswith(RECORDS_SUFFIX)


def write_records_vocabulary(prefix, files):
    """Records next to the shards `<prefix>_*.tfrecord` which vocabulary made them."""
    record = files.record()
    fileio.write_json_atomic(prefix + RECORDS_SUFFIX, {
        "vocabulary": fileio.absolute(files.vocab), "emoji": fileio.absolute(files.emoji),
        **{key: getattr(record, key) for key in _RECORD_KEYS}}, indent=2)


def records_vocabulary(shards):
    """(record of the shards or None, shards without a record).

    The record is the `<prefix>.vocabulary.json` dict (+ "sidecar": its path); shards made with
    different vocabularies are refused.
    """
    found, absent, unrecorded = {}, set(), []
    for shard in shards:
        sidecar = records_sidecar(shard)
        if sidecar and sidecar not in found and sidecar not in absent:
            if fileio.isfile(sidecar):  # once per prefix (a bucket may hold many shards)
                found[sidecar] = _read_sidecar(sidecar)
            else:
                absent.add(sidecar)
        if not (sidecar and sidecar in found):
            unrecorded.append(shard)
    records = list(found.values())
    for other in records[1:]:
        if (other["vocab_sha256"], other["emoji_sha256"]) != (records[0]["vocab_sha256"],
                                                              records[0]["emoji_sha256"]):
            raise VocabularyMismatch(
                f"the TFRecords were made with different vocabularies: {records[0]['sidecar']} "
                f"(sha256 {short(records[0]['vocab_sha256'])}) and {other['sidecar']} (sha256 "
                f"{short(other['vocab_sha256'])}); train on shards of one vocabulary")
    return (records[0] if records else None), unrecorded


def _read_sidecar(path):
    data = fileio.read_json(path, "TFRecord vocabulary record")
    keys = ("vocabulary", "emoji") + _RECORD_KEYS
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) for k in keys):
        raise GPTSANError(f"{path} is not a TFRecord vocabulary record (keys {', '.join(keys)})")
    data = {**{k: data[k] for k in keys}, "sidecar": path}
    _sidecar_record(data)  # validates the fingerprints
    return data


def check_records(files, data):
    """`files` must be the vocabulary TFRecords were made with (`data`: their record)."""
    check_recorded(files, _sidecar_record(data), data["sidecar"],
                   (data["vocabulary"], data["emoji"]), RECORDS_REASON)


def _sidecar_record(data):
    return VocabularyParams(**{k: data[k] for k in _RECORD_KEYS})


def records_files(shard, vocabulary=None, emoji=None):
    """The checked VocabularyFiles to read TFRecord `shard` with: --vocabulary / --emoji, which
    must match the shard's record, or else the files the record names."""
    sidecar = records_sidecar(shard)
    data = _read_sidecar(sidecar) if sidecar and fileio.isfile(sidecar) else None
    if vocabulary:
        files = VocabularyFiles.of(vocabulary, emoji or _emoji_next_to(vocabulary))
    elif data is not None:
        files = VocabularyFiles.of(data["vocabulary"], emoji or data["emoji"])
    else:
        raise GPTSANError(f"{shard} has no vocabulary record next to it "
                          f"({sidecar or '<prefix>' + RECORDS_SUFFIX}): pass --vocabulary (and "
                          "--emoji), the files it was made with")
    if data is not None:
        check_records(files, data)
    return files


def data_tool_files(vocabulary, emoji):
    """The VocabularyFiles of a data tool (make_tfrecord, encode_swe): --vocabulary has no
    default (the project's file and the published one share a name); emoji default next to it.
    The note names which vocabulary it is."""
    if not vocabulary:
        raise GPTSANError("pass --vocabulary: this repository's ja-swe36k.txt (its own "
                          "vocabulary) for a new model, or the published ja-swe36k.txt for the "
                          "published checkpoint")
    files = VocabularyFiles.of(vocabulary, emoji or _emoji_next_to(vocabulary))
    return dataclasses.replace(files, note=f"vocabulary: {files.vocab} ({files.name}, sha256 "
                                           f"{short(files.vocab_sha256)})")

