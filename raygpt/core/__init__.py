"""The training core, with no Ray: the GPT, tokens and batches, the step and evaluation, parallelism, fp8,
the memory estimate, what a checkpoint holds and how it is read safely, and GPT-2's Hugging Face weights."""
