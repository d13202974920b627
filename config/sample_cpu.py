# A small RoPE + GQA model that pre-trains on 2 CPU cores in minutes on the bundled sample (python prepare.py
# sample: 3,365 real TinyStories to train on, 177 to validate): the whole pipeline without a GPU.
# 11.5M parameters, 8.3M of them the 32,256 x 256 embedding; shorter windows than T5's 512 / 256 for speed.
# Measured on a quiet 2-core machine (2 threads): 4 min 39 s for the README's quick-start line (prepare,
# train, sample), ~3,000 tokens/s; validation loss 11.03 -> 5.50. On a busy machine use OMP_NUM_THREADS=1.
out_dir = "out/sample_cpu"
dataset = "sample"
epochs = 1.0            # 211 steps of 16 documents: the 3,365 training stories once, ~708k tokens
batch_size = 16
micro_batch_size = 16
encoder_len = 256
decoder_len = 128
learning_rate = 2e-3    # a small model trained for few steps tolerates (and needs) more than the seed's 5e-4
log_interval = 5
eval_interval = 25      # + the final evaluation: 9 points on the validation curve
eval_docs = 177         # the whole validation split: the curve and the final number agree
eval_batch_size = 32
device = "cpu"

d_model = 256
n_heads = 4
head_dim = 64
n_kv_heads = 2          # GQA: 2 query heads per K/V head
d_ff = 1024
n_encoder_layers = 2
n_decoder_layers = 2
position = "rope"
ffn = "relu"
tie_embeddings = True
