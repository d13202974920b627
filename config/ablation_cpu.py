# The CPU scale of the ablation (python ablation.py --scale cpu): applied after each variant's preset
# (config/t5_base.py ... rot5_base_moe_losses.py), it shrinks the model and the data so that all five
# variants pre-train on the bundled sample (python prepare.py sample: 7,204 real TinyStories) on a CPU, three
# seeds each. Budget: one seed of the whole study (5 pre-trainings of 226 steps, each ending with the full
# validation split, and 2 fine-tunings) took 45.5 minutes on a 2-core AMD EPYC (OMP_NUM_THREADS=2, quiet but
# for ~1.5 minutes lost to other jobs), ~9 minutes a variant, the 32,256-word output layer much of it; that
# was before train.py's huge pages and fused AdamW, which make a step faster (BENCHMARKS.md).
# ablation.py adds what differs per variant at this size: GQA keeps 2 of the 4 K/V heads (the presets'
# 3 query heads per K/V head does not divide 4 heads), MoE uses 4 experts (not 8).
# Every variant sees the same documents, in the same order, with the same corruption (matched compute).
dataset = "sample"
epochs = 0.5            # 226 steps of 16 documents = half the 7,204 training stories, ~0.74M tokens per variant
batch_size = 16         # the same for every variant (the seed used 256 for MoE; here MoE is matched too)
micro_batch_size = 16
encoder_len = 256       # shorter windows than T5's 512 / 256 for speed; 90% of the stories are < 283 tokens
decoder_len = 128
learning_rate = 2e-3    # a small model trained for few steps tolerates (and needs) a higher peak
log_interval = 5
eval_interval = 25      # a point on the validation curve every 400 documents
eval_docs = 32          # the curve's fixed validation subset (the seed: 500); the final number uses all 966
eval_batch_size = 32
device = "cpu"
compile = False         # eager on the CPU (the presets compile for the GPU)
attention_dropout = 0.1 # HF T5's placement, as the write-up's runs and the study in the README were measured

d_model = 256
n_heads = 4
head_dim = 64
n_kv_heads = 4          # multi-head; ablation.py sets 2 for the GQA variants
d_ff = 1024
n_encoder_layers = 2
n_decoder_layers = 2
