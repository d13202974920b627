# The quick start: a small RoPE + GQA model that pre-trains with UL2 on 2 CPU cores in the README's 10-minute
# budget (prepare + train + sample) on the bundled sample (python prepare.py sample: 7,204 real TinyStories to
# train on, the 966 genuine V1 validation stories to validate on). 11.5M parameters, 8.3M of them the
# 32,256 x 256 embedding; shorter windows than T5's 512 / 256 for speed.
# Tuned for the continuation loss on the validation stories (issue #15; numbers in BENCHMARKS.md): at a
# fixed 10 minutes more tokens through this shallow model beat a deeper one (4 + 4 layers costs 1.6x per
# token, and ~1M tokens are far too few for even this body); no dropout (less than one epoch: nothing to
# overfit); half the batch for twice the updates; as many epochs as the budget holds. On a busy machine
# use OMP_NUM_THREADS=1.
out_dir = "out/sample_cpu"
dataset = "sample"
epochs = 0.75           # 676 steps of 8 documents, 1.11M tokens: the README line took 8 min 59 s on a quiet 2-core EPYC
batch_size = 8
micro_batch_size = 8
encoder_len = 256
decoder_len = 128
learning_rate = 3e-3    # a small model trained for few steps tolerates (and needs) more than the seed's 5e-4
dropout = 0.0
log_interval = 25
eval_interval = 200     # + step 0 and the final evaluation: 4 points on the validation curve
eval_docs = 50          # the curve's subset (cheap); the final numbers use all 966 validation stories (~1 min)
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
