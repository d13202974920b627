# The seed's summarization fine-tuning ("Initial Summarization Tuning", repeated for the Chinchilla-sized
# ROT5-mini): 1M (story, summary) pairs of TinyStories-Instruct, one epoch, effective batch 32, learning
# rate 1e-4; the rest as in pre-training (AdamW wd 0.01, 1% linear warm-up then linear decay, clip 1, bf16).
# Needs `python prepare.py tinystories_instruct` and a pre-trained out/rot5_mini/ckpt.pt (config/rot5_mini.py).
init_from = "out/rot5_mini/ckpt.pt"
out_dir = "out/rot5_mini_summary"
dataset = "tinystories_instruct"
train_pairs = 1_000_000
epochs = 1.0
batch_size = 32
micro_batch_size = 32
learning_rate = 1e-4
weight_decay = 0.01
warmup_frac = 0.01
grad_clip = 1.0

encoder_len = 512      # TinyStories stories are ~200 tokens; the rare longer one is cut (and counted)
decoder_len = 128      # summaries are one or two sentences (~40-60 tokens)
eval_interval = 2000   # ~16 evaluations over the 31,250 steps
eval_pairs = 500       # the seed's 500-entry validation subset
num_beams = 1          # greedy; --num_beams=4 for beam search
