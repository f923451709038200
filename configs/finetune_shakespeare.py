# Fine-tune GPT-2 XL on tiny Shakespeare (GPT-2 BPE tokens: python -m raygpt.prepare shakespeare).
import time

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-" + str(time.time())

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2
always_save_checkpoint = False  # keep only checkpoints that improve val loss

# 32 sequences of 1024 tokens per iteration: about 32k tokens; the corpus has ~300k, so one epoch ~ 9 iterations.
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5  # fine-tune gently, at a constant rate
decay_lr = False
