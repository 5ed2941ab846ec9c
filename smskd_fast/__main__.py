"""`python -m smskd_fast ...` runs the smskd-fast command line."""
from smskd_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
