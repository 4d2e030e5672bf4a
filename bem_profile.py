#!/usr/bin/env python3
"""The seed's `python bem_profile.py [--comprehensive] [--out RUN_DIR]`: a thin wrapper over `bem profile`."""
import sys

from bem.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
