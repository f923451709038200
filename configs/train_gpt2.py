# GPT-2 (124M) on OpenWebText: about 0.5M tokens per iteration (12 sequences x 1024 tokens x 40
# micro-steps over all workers), 300B tokens in all; val loss near 2.85 at the end.
# Prepare the data first: python -m raygpt.prepare openwebtext --input 'owt/*.parquet'
wandb_log = True
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8  # global: divided among the workers

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
