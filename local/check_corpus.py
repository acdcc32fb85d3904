#!/usr/bin/env python3
"""Check a real (or generated) corpus before preparation: layout, Kaldi files, every wav.

    python local/check_corpus.py --corpus kespeech --set kespeech_dir=/data/KeSpeech
    python local/check_corpus.py --corpus aishell --set aishell_dir=/data/aishell [skip_bad=true]

Errors name the file and line; with skip_bad=true bad audio is counted instead (docs/data.md).
"""
import sys

from hdmole.data.prepare import main

if __name__ == "__main__":
    main(["--check-only", *sys.argv[1:]])
