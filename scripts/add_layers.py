"""Adds extra dense Transformer layers on top of a GPTSAN model (published `run_modelconvert
--add_extra_stage N`), for fine-tuning only the new layers on a frozen backbone.

    python scripts/add_layers.py --src MODEL_DIR --dst NEW_DIR --add_extra_stage 4 [--force]

The new directory gets the extended checkpoint (streamed: memory stays near the largest
tensor), parameters.json (num_ext_layers + N), the vocabulary/emoji copies, the published
transformer-params.json / all-params.json, and ignore-params.json: the variables to freeze (pass
it to `run_train.py --ignore_parameters`). By default everything is as the published tool does
it: new kernels AND biases ~ N(0, 0.02), pasts/out/kernel drawn anew, the source's
ignore-params.json copied unchanged (required). `--init fan_in`, `--spout_out extend` and
`--frozen existing` choose the alternatives. No optimizer slots are written: the fine-tuning run
(`run_train.py --init_checkpoint NEW_DIR`) starts a fresh optimizer at step 0.
"""
import os


from gptsan.checkpoint import (ADD_INITS, FROZEN_LISTS, IGNORE_PARAMS_FILE,
                               SPOUT_OUTS, add_layers_to_model_dir)
from gptsan.tensorio import use_plain_cpu_allocator
from gptsan.errors import ArgumentParser, run_cli


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="source model directory")
    parser.add_argument("--dst", required=True, help="new model directory")
    parser.add_argument("--add_extra_stage", type=int, required=True,
                        help="number of dense layers to add")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the new weights")
    parser.add_argument("--init", choices=ADD_INITS, default="published",
                        help="published: every new random tensor (biases too) ~ N(0, 0.02); "
                             "fan_in: kernels ~ N(0, fan_in^-0.5), zero biases")
    parser.add_argument("--spout_out", choices=SPOUT_OUTS, default="reinit",
                        help="pasts/out/kernel: reinit (published: drawn anew) or extend (old "
                             "columns kept, zero for the new layers)")
    parser.add_argument("--frozen", choices=FROZEN_LISTS, default="source",
                        help="ignore-params.json: source (published: the source's, copied) or "
                             "existing (every source variable but pasts/out/kernel)")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    use_plain_cpu_allocator()
    config = add_layers_to_model_dir(args.src, args.dst, args.add_extra_stage, seed=args.seed,
                                     force=args.force, progress=True, init=args.init,
                                     spout_out=args.spout_out, frozen=args.frozen)
    model = config.model
    print(f"wrote {args.dst}: {model.num_switch_layers} switch + {model.num_ext_layers} extra "
          f"layers; freeze the variables listed in {os.path.join(args.dst, IGNORE_PARAMS_FILE)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
