# Evaluate OpenAI's gpt2-large weights on OpenWebText's train and val splits, then exit.
batch_size = 8
eval_iters = 500  # more batches for a steadier estimate
eval_only = True
wandb_log = False
init_from = "gpt2-large"
