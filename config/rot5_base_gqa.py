# Ablation step 2: RoPE + grouped-query attention (Ainslie et al. 2023): 12 query heads share 4 K/V
# heads, 3 per group, as in the seed: ~195M parameters. The seed's best pre-training variant.
# Pre-training as in the seed: UL2 on 1 epoch of plain TinyStories, effective batch 300.
out_dir = "out/rot5_base_gqa"
dataset = "tinystories"
epochs = 1.0
batch_size = 300        # documents per optimizer step, over all ranks and accumulation steps
micro_batch_size = 30   # per rank per forward; grad accumulation = batch_size / (micro_batch_size * world_size)
compile = True          # one graph per step; on a GPU its attention is FlexAttention (README, "Attention kernels")

d_model = 768
n_heads = 12
head_dim = 64
n_kv_heads = 4     # 3 query heads share each K/V head
d_ff = 3072
n_encoder_layers = 12
n_decoder_layers = 12
position = "rope"
ffn = "relu"
tie_embeddings = True
