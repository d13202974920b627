# Ablation step 4: the MoE model of rot5_base_moe.py plus its two auxiliary losses: load balancing
# (Switch Transformer eq. 4) and the router z-loss (ST-MoE eq. 5). Effective batch 256 as in the seed.
out_dir = "out/rot5_base_moe_losses"
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
aux_loss_coef = 1e-2   # Switch Transformer eq. 4
z_loss_coef = 1e-3     # ST-MoE router z-loss (Zoph et al. 2022, eq. 5)
