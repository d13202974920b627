# ROT5-mini: the seed's Chinchilla-sized model. 2 epochs of TinyStories-Instruct read as unlabeled text
# are D = 1.37B tokens, so C = (D / 0.3)^(1 / 0.55) = 3.65e17 FLOPs and N_opt = 0.6 C^0.45 = 48M parameters
# (Hoffmann et al. 2022, as the seed applies it). 16 heads x 32 dims, FFN 512, 4 query heads per K/V head,
# and 10 + 10 layers give ~47M. Effective batch 1280.
out_dir = "out/rot5_mini"
dataset = "tinystories_instruct"
epochs = 2.0
batch_size = 1280
micro_batch_size = 64   # 20 accumulation steps on one GPU; with torchrun, per GPU
eval_interval = 250     # 2 x 2,476,533 documents / 1280 = 3,870 steps: ~15 points on the validation curve
compile = True          # one graph per step; on a GPU its attention is FlexAttention (README, "Attention kernels")

d_model = 512
n_heads = 16
head_dim = 32
n_kv_heads = 4
d_ff = 512
n_encoder_layers = 10
n_decoder_layers = 10
position = "rope"
ffn = "relu"
tie_embeddings = True
