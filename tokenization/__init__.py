"""Corpus to tokens: readers, work units, the sentencepiece tokenizer, Arrow shards, the training data.

Modules, in the order data flows through them: `sources` (which files), `units` (deterministic work
units, train/val split), `readers` (streaming documents, bad-input counters), `tokenizer`
(sentencepiece training and loading), `shards` (the Arrow format), `manifest` (the stage's index),
`dataset` (memory-mapped token stream) and `sampler` (the magic-prime window walk). No torch, Ray or
MLflow here: the stages that use these live in `pipeline/` and `orchestration/`.
"""
