# T5-Base, v1.0 flavour (ReLU FFN, tied embeddings, learned relative position bias, multi-head attention)
# with the Mistral vocabulary: the reference of the seed's ablation, ~223M parameters.
# Pre-training as in the seed: UL2 on 1 epoch of plain TinyStories, effective batch 300.
out_dir = "out/t5_base"
dataset = "tinystories"
epochs = 1.0
batch_size = 300        # documents per optimizer step, over all ranks and accumulation steps
micro_batch_size = 30   # per rank per forward; grad accumulation = batch_size / (micro_batch_size * world_size)
compile = True          # one graph per step; on a GPU its attention is FlexAttention (README, "Attention kernels")

d_model = 768
n_heads = 12
head_dim = 64
n_kv_heads = 12
d_ff = 3072
n_encoder_layers = 12
n_decoder_layers = 12
position = "t5"
ffn = "relu"
tie_embeddings = True
