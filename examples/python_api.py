"""A hand-written training loop with ``lowmem.create_optimizer``.

    python examples/python_api.py
"""

import torch

import lowmem
from lowmem.kit import load_model_and_tokenizer, sft_dataset, tokenize_sft

torch.manual_seed(0)
model, tokenizer = load_model_and_tokenizer()
train = tokenize_sft(sft_dataset(2000), tokenizer).with_format("torch")
held_out = tokenize_sft(sft_dataset(128, split="eval"), tokenizer).with_format("torch")[:]

# Given a module, create_optimizer builds the parameter groups itself (no decay on norm weights).
optimizer = lowmem.create_optimizer(model, "adamw", lr=3e-3, weight_decay=0.01)


@torch.no_grad()
def eval_loss() -> float:
    model.eval()
    loss = model(input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"], labels=held_out["labels"]).loss
    model.train()
    return loss.item()


initial = eval_loss()
print(f"step   0: held-out loss {initial:.3f}")
loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
step = 0
while step < 150:  # epochs
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0:
            print(f"step {step:3d}: train loss {loss.item():.3f}, held-out loss {eval_loss():.3f}")
        if step == 150:
            break
print(f"optimizer state: {optimizer.state_bytes():,} bytes")
assert eval_loss() < initial, "the held-out loss should fall"
