"""What the stages read: corpora and token caches, SFT pairs, preference files (rankings and
ratings), prompt files, and the stdlib docstring pairs; each layout has one owner here."""
