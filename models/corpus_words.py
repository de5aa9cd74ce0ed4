"""Writes the English words of the default model's training corpus (WordNet 3.0 glosses and examples, the
same documents train_default.py builds) that occur at least 3 times, one per line, for the test that checks
the default model writes English words rather than noise.

  python3 models/corpus_words.py > tests/fixtures/default-model-words.txt
"""
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_default import SPECIALS, wordnet_docs  # noqa: E402

counts = collections.Counter()
strip = re.compile("|".join(re.escape(s) for s in SPECIALS))
for d in wordnet_docs():
    counts.update(w.lower() for w in re.findall(r"[A-Za-z]+", strip.sub(" ", d)))
for w in sorted(w for w, c in counts.items() if c >= 3):
    print(w)
