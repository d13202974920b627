# The bundled-sample exercise, on a CPU in under a minute: fine-tune the tiny model that
# `python train.py config/sample_cpu.py` pre-trains, on the 3 real TinyStories-Instruct records of
# data/sample/instruct.txt (`python prepare.py sample_instruct`: 2 train pairs, 1 validation pair).
# Three records are far too few to learn summarizing: this checks the pipeline end to end (training,
# generation, ROUGE-L, files), it does not measure anything. Real numbers: config/finetune_summary.py.
init_from = "out/sample_cpu/ckpt.pt"
out_dir = "out/sample_cpu_summary"
dataset = "sample_instruct"
train_pairs = 0          # all (2)
epochs = 10.0            # 10 steps of the 2 pairs
batch_size = 2
micro_batch_size = 1     # exercises gradient accumulation (2 x 1)
learning_rate = 1e-3     # a tiny model on 2 pairs: the training loss visibly falls within 10 steps
warmup_frac = 0.1
decoder_len = 64         # the 3 summaries are 29-47 tokens (+ eos)
eval_interval = 5
eval_pairs = 3
eval_batch_size = 3
log_interval = 1
device = "cpu"
