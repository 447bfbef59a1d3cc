"""Adds extra dense Transformer layers on top of a GPTSAN model (published `run_modelconvert
--add_extra_stage N`), for fine-tuning only the new layers on a frozen backbone.

    python scripts/add_layers.py --src MODEL_DIR --dst NEW_DIR --add_extra_stage 4 [--force]

The new directory gets the extended checkpoint, parameters.json (num_ext_layers + N), the
vocabulary/emoji copies and ignore-params.json: the variables to freeze (pass it to
`run_train.py --ignore_parameters`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from gptsan.checkpoint import IGNORE_PARAMS_FILE, add_layers_to_model_dir  # noqa: E402
from gptsan.errors import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="source model directory")
    parser.add_argument("--dst", required=True, help="new model directory")
    parser.add_argument("--add_extra_stage", type=int, required=True,
                        help="number of dense layers to add")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the new weights")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = add_layers_to_model_dir(args.src, args.dst, args.add_extra_stage, seed=args.seed,
                                     force=args.force, progress=True)
    model = config.model
    print(f"wrote {args.dst}: {model.num_switch_layers} switch + {model.num_ext_layers} extra "
          f"layers; freeze the variables listed in {os.path.join(args.dst, IGNORE_PARAMS_FILE)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
