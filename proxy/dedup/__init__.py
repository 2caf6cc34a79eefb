"""Dedup's own parts, free of the pipeline: the key of a request (`key`) and the finished
answers kept for replay (`answers`).  The stage that uses them is pipeline/dedup.py; the
fan-out of a live call is pipeline/fanout.py."""
