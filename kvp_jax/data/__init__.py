"""Data for kvp_jax: an offline code corpus, synthetic long-context QA, a byte-level BPE tokenizer, a grain LM
input pipeline and loaders for SQuAD v2, TriviaQA and HumanEval files.

Submodules are imported on use (`from kvp_jax.data import pipeline`) so that importing one does not pull in grain,
transformers or datasets for the others.
"""
