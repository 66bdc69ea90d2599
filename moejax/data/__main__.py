"""`python -m moejax.data preview ...` (see moejax.data.preview)."""
from moejax.data.preview import main
from moejax.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
