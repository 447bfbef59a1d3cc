"""Model and training configuration: the `parameters.json` of a GPTSAN model directory.

The JSON keeps the published layout and key names:
    {"model_params": {num_contexts, num_switch_layers, num_ext_layers, num_hidden, num_header,
                      num_experts, num_spout, num_vocabulary, num_pallarelizm, train_mode,
                      num_moe_hidden, num_ext_hidden},
     "train_params": {output_dir, batch_size, base_lr, num_warmup_steps, max_to_keep_save,
                      checkpoint_per_hours, checkpoint_per_steps, ...},
     "vocabulary_params": {vocab_file, emoji_file, vocab_sha256, emoji_sha256, vocab_name}}
The last section is new (published directories have none): which vocabulary goes with the model,
see gptsan/fingerprint.py.
"""
import dataclasses
import json
import re
from typing import Optional

from gptsan.errors import GPTSANError
from gptsan import fileio
from gptsan.fileio import read_json, write_text_atomic

PARAMETERS_FILE = "parameters.json"  # the config file inside a model directory
VOCAB_FILE = "ja-swe36k.txt"  # published name of the vocabulary copy inside a model directory
EMOJI_FILE = "emoji.json"  # published name of the emoji table copy inside a model directory
VOCABULARY_SECTION = "vocabulary_params"  # new parameters.json section (VocabularyParams)
MOE_HIDDEN_FACTOR = 8  # published code hard-codes the expert width as 8 * num_hidden
EXT_HIDDEN_FACTOR = 4  # published code hard-codes the extra-layer width as 4 * num_hidden
TRAIN_MODES = ("lm", "mlm", "hybrid")
PUBLISHED_WEIGHT_DECAY = 0.01  # published optimization.py: weight_decay_rate=0.01 (always on)
# published exclude_from_weight_decay ["LayerNorm", "layer_norm", "bias"] (re.search on the name)
PUBLISHED_NO_DECAY_PATTERN = "LayerNorm|layer_norm|bias"
PUBLISHED_CLIP_NORM = 0.01  # published clip_by_global_norm(clip_norm=0.01); first version: 1.0


@dataclasses.dataclass
class ModelConfig:
    """Shapes of the network. Defaults are the published GPTSAN-2.8B."""
    num_contexts: int = 1280  # positions (sequence length)
    num_switch_layers: int = 10  # Switch Transformer layers (experts + softmlp)
    num_ext_layers: int = 0  # extra dense layers stacked on top (fine-tuning)
    num_hidden: int = 1024  # d_model
    num_header: int = 16  # attention heads
    num_experts: int = 16  # experts per Switch layer
    num_spout: int = 128  # spout vector width (0: no spout)
    num_vocabulary: int = 36000  # vocabulary entries
    num_pallarelizm: int = 1  # model-parallel size (mesh "model" dimension)
    train_mode: str = "lm"  # lm | mlm | hybrid
    num_moe_hidden: int = 0  # expert hidden width; 0 -> 8 * num_hidden
    num_ext_hidden: int = 0  # extra-layer hidden width; 0 -> 4 * num_hidden

    def __post_init__(self):
        if not self.num_moe_hidden:
            self.num_moe_hidden = MOE_HIDDEN_FACTOR * self.num_hidden
        if not self.num_ext_hidden:
            self.num_ext_hidden = EXT_HIDDEN_FACTOR * self.num_hidden
        for name in ("num_contexts", "num_hidden", "num_header", "num_vocabulary",
                     "num_pallarelizm", "num_moe_hidden", "num_ext_hidden"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_switch_layers", "num_ext_layers", "num_spout"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.num_layers > 0, "the model needs at least one layer "
                 "(num_switch_layers + num_ext_layers > 0)")
        _require(self.num_switch_layers == 0 or self.num_experts > 0,
                 f"num_experts must be > 0 with Switch layers, got {self.num_experts}")
        _require(self.num_hidden % self.num_header == 0,
                 f"num_header={self.num_header} must divide num_hidden={self.num_hidden}")
        _require(self.train_mode in TRAIN_MODES,
                 f"train_mode must be one of {', '.join(TRAIN_MODES)}, got {self.train_mode!r}")
        self.validate_model_parallel(self.num_pallarelizm)

    @property
    def num_layers(self):
        return self.num_switch_layers + self.num_ext_layers

    @property
    def head_dim(self):
        return self.num_hidden // self.num_header

    def validate_model_parallel(self, model_parallel):
        """Heads and experts are split over the mesh "model" dimension: both must divide."""
        _require(self.num_header % model_parallel == 0,
                 f"num_header={self.num_header} is not divisible by the model-parallel size "
                 f"{model_parallel}; choose a mesh 'model' size that divides it")
        if self.num_switch_layers:
            _require(self.num_experts % model_parallel == 0,
                     f"num_experts={self.num_experts} is not divisible by the model-parallel "
                     f"size {model_parallel}; choose a mesh 'model' size that divides it")

    def validate_vocabulary(self, vocabulary_size, source="the vocabulary"):
        _require(vocabulary_size == self.num_vocabulary,
                 f"{source} has {vocabulary_size} entries but the model expects "
                 f"num_vocabulary={self.num_vocabulary}; use the vocabulary the model was "
                 "trained with (the copy in its model directory)")


@dataclasses.dataclass
class TrainConfig:
    """Run settings kept with the model (published `train_params` plus new keys)."""
    output_dir: str = ""
    batch_size: int = 8
    base_lr: float = 1e-4
    num_warmup_steps: int = 10000
    max_to_keep_save: int = 5
    checkpoint_per_hours: float = 1.0
    checkpoint_per_steps: int = 10000
    optimizer: str = "adam"  # adam | adafactor
    weight_decay: float = PUBLISHED_WEIGHT_DECAY  # AdamW decoupled weight decay rate
    no_decay_pattern: str = PUBLISHED_NO_DECAY_PATTERN  # regex: matching variable names skip decay
    adam_bias_correction: bool = False  # the published AdamW has none
    warmup_from_one: bool = False  # published: warm-up lr = base_lr * step / warmup (0 at step 0)
    max_training_step: int = 0  # 0: no limit
    seed: int = 0

    def __post_init__(self):
        _require(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _require(self.optimizer in ("adam", "adafactor"),
                 f"optimizer must be adam or adafactor, got {self.optimizer!r}")
        _require(self.checkpoint_per_steps > 0,
                 f"checkpoint_per_steps must be > 0, got {self.checkpoint_per_steps}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        try:
            re.compile(self.no_decay_pattern)
        except re.error as err:
            raise GPTSANError(f"no_decay_pattern {self.no_decay_pattern!r} is not a regular "
                              f"expression: {err}") from None


@dataclasses.dataclass
class VocabularyParams:
    """The vocabulary a model directory goes with; the project records it whenever it writes a
    directory. What the fingerprints cover: gptsan/fingerprint.py."""
    vocab_file: str = VOCAB_FILE  # name of the vocabulary copy in the model directory
    emoji_file: str = EMOJI_FILE  # name of the emoji table copy in the model directory
    vocab_sha256: str = ""  # fingerprint of the vocabulary
    emoji_sha256: str = ""  # fingerprint of the emoji table
    vocab_name: str = ""  # which vocabulary this is, for people

    def __post_init__(self):
        for name in ("vocab_file", "emoji_file"):
            value = getattr(self, name)
            _require(value not in ("", ".", "..") and not re.search(r"[/\\]", value),
                     f"{VOCABULARY_SECTION}.{name} must be a file name inside the model "
                     f"directory, got {value!r}")
        for name in ("vocab_sha256", "emoji_sha256"):
            _require(re.fullmatch(r"[0-9a-f]{64}", getattr(self, name)) is not None,
                     f"{VOCABULARY_SECTION}.{name} must be a SHA-256 hex digest, "
                     f"got {getattr(self, name)!r}")


@dataclasses.dataclass
class GPTSANConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    vocabulary: Optional[VocabularyParams] = None  # None: not recorded (published directories)

    @classmethod
    def from_dict(cls, data, source="config"):
        if not isinstance(data, dict) or "model_params" not in data:
            raise GPTSANError(f"{source}: expected a JSON object with 'model_params' "
                              "(and optionally 'train_params')")
        unknown = set(data) - {"model_params", "train_params", VOCABULARY_SECTION}
        _require(not unknown, f"{source}: unknown section(s) {sorted(unknown)}; "
                 f"expected model_params, train_params and {VOCABULARY_SECTION}")
        vocabulary = data.get(VOCABULARY_SECTION)
        return cls(model=_build(ModelConfig, data["model_params"], source, "model_params"),
                   train=_build(TrainConfig, data.get("train_params", {}), source, "train_params"),
                   vocabulary=None if vocabulary is None else
                   _build(VocabularyParams, vocabulary, source, VOCABULARY_SECTION))

    @classmethod
    def from_json_file(cls, path):
        """Loads a `parameters.json` (or a model directory containing one)."""
        if fileio.isdir(path):
            path = fileio.join(path, PARAMETERS_FILE)
        return cls.from_dict(read_json(path, "config file"), source=path)

    def to_dict(self):
        data = {"model_params": dataclasses.asdict(self.model),
                "train_params": dataclasses.asdict(self.train)}
        if self.vocabulary is not None:
            data[VOCABULARY_SECTION] = dataclasses.asdict(self.vocabulary)
        return data

    def to_json_file(self, path):
        """Writes atomically (temp file + rename): never leaves a partial file."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


SPOUT_DEPTH = 8  # published spout: 8 tanh dense layers before the K/V projection


def _build(cls, values, source, section):
    if not isinstance(values, dict):
        raise GPTSANError(f"{source}: {section} must be a JSON object")
    known = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    _require(not unknown, f"{source}: unknown {section} key(s) {unknown}; "
             f"known keys: {', '.join(known)}")
    for name, value in values.items():
        kind = known[name]
        expected = (int, float) if kind is float else kind
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, expected):
            raise GPTSANError(f"{source}: {section}.{name} must be {kind.__name__}, got {value!r}")
    return cls(**values)


def _require(condition, message):
    if not condition:
        raise GPTSANError(message)
