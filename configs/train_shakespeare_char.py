# A small character-level GPT on tiny Shakespeare: the nanoGPT "baby GPT" (about 10.7M parameters).
# On one modern GPU it reaches a val loss near 1.47 in a few minutes.
out_dir = "out-shakespeare-char"
eval_interval = 250  # evaluate often: this model overfits the small corpus
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # only keep checkpoints that improve val loss

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small models tolerate a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # few tokens per iteration: average the second moment over longer
warmup_iters = 100

# raygpt only: a 10M-parameter model is launch-bound; CUDA graphs replay each step in a few launches.
# Same numerics as the default mode. Ignored on CPU.
compile_mode = "reduce-overhead"
# raygpt only: evaluate without compiling a second (eval) graph. Each eval costs ~0.25 s more on an
# H100 (21 evals: ~5 s) against ~14 s to compile the eval graph in a run this short.
compile_eval = False
