# Ablation step 3: RoPE + GQA + Switch mixture of experts (Fedus et al. 2021): every other FFN becomes
# 8 experts with top-1 routing, without the auxiliary losses (see rot5_base_moe_losses.py for those).
# The seed lowered the effective batch to 256 for the MoE runs to fit in memory.
out_dir = "out/rot5_base_moe"
dataset = "tinystories"
epochs = 1.0
batch_size = 256
micro_batch_size = 32
compile = True          # one graph per step; on a GPU its attention is FlexAttention (README, "Attention kernels")

d_model = 768
n_heads = 12
head_dim = 64
n_kv_heads = 4
d_ff = 3072
n_encoder_layers = 12
n_decoder_layers = 12
position = "rope"
ffn = "relu"
tie_embeddings = True
n_experts = 8
moe_top_k = 1
aux_loss_coef = 0.0
z_loss_coef = 0.0
