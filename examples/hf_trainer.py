"""A plain ``transformers.Trainer`` with a lowmem optimizer via ``optimizer_cls_and_kwargs``.

Runs offline on CPU: the embedded tiny Llama on synthetic addition, 150 steps (20 s with its imports on a
2-core machine shared at a load of 5).

    python examples/hf_trainer.py
"""

import tempfile

from transformers import Trainer, TrainingArguments, default_data_collator

from lowmem.kit import load_model_and_tokenizer, sft_dataset, tokenize_sft
from lowmem.trainers import optimizer_cls_and_kwargs

model, tokenizer = load_model_and_tokenizer()  # None = the embedded tiny Llama; or a local HF directory
train = tokenize_sft(sft_dataset(2000), tokenizer)
held_out = tokenize_sft(sft_dataset(128, split="eval"), tokenizer)

args = TrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=150, per_device_train_batch_size=16, learning_rate=1e-2,
    lr_scheduler_type="constant", logging_steps=50, save_strategy="no", report_to="none",
    dataloader_pin_memory=False,
)
trainer = Trainer(
    model=model, args=args, train_dataset=train, eval_dataset=held_out, data_collator=default_data_collator,
    # lowmem's parameter groups and optimizer; learning_rate / weight_decay / betas / eps come from `args`
    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "adafactor", args=args),
)
before = trainer.evaluate()["eval_loss"]
trainer.train()
after = trainer.evaluate()["eval_loss"]
print(f"held-out loss {before:.3f} -> {after:.3f}; optimizer state {trainer.optimizer.optimizer.state_bytes():,} bytes")
assert after < before, "the held-out loss should fall"
