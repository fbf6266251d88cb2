"""GVPOTrainer's gradient and BNPOTrainer's advantages inside real TRL training steps, against plain-torch
computations written from the papers' equations (not lowmem's functions):

* GVPO (Zhang et al. 2025, arXiv:2504.19599, Eq. 9 / the authors' ``compute_policy_loss_gvpo``): per group of
  ``G`` completions, ``sum_i 0.5 ((r_i - mean r) - (R_i - mean R))^2 / (G - 1)``, ``r_i = beta (log pi_theta(y_i) -
  log pi_ref(y_i))`` summed over the completion's tokens (padding after EOS excluded), mean over groups;
  ``R_i`` the ``reward_weights``-weighted sum of the reward functions.
* BNPO (Xiao et al. 2025, arXiv:2506.02864, Eq. 9 and Sec. 4; the authors' ``compute_bnpo_outcome_advantage``):
  ``A_i = (R_i - p) / BetaPDF(p; alpha, beta)`` capped at 1e6, ``p`` the group mean of rewards rescaled to [0, 1],
  ``alpha = max(1 + a/3, 1)``, ``beta = max(1 + b/3, 1)`` from the batch's method-of-moments fit ``a, b``; with
  several reward functions the mean of their advantages.

The gradient is read from the parameters' ``.grad`` before the optimizer step (no clipping), the reference
recomputes log-probabilities with a fresh copy of the model at the parameters the batch was generated /
trained with. The model's EOS row is raised so that completions end early at different lengths (masking).
"""

from __future__ import annotations

import math

import pytest
import torch

G = 4


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory):
    """The tiny Llama with its EOS logit raised (about 1 in 4 tokens) so completions have different lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem.kit import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("eos-model"), seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        enc = tok(["12+7=", "3+4=", "40+1=", "9+9="], return_tensors="pt", padding=True)
        h = model.model(**enc).last_hidden_state.reshape(-1, model.config.hidden_size).mean(0)
        model.lm_head.weight[tok.eos_token_id] = h / h.norm() ** 2 * math.log(0.25 * model.config.vocab_size / 0.75)
    model.save_pretrained(path)
    return path


class _Recorder:
    """Reward functions in TRL's signature that record what they returned; batches, parameters and gradients."""

    def __init__(self):
        self.rewards: list[list[list[float]]] = []  # per generation: one list per reward function
        self.prompts: list[list[str]] = []  # per generation
        self.batches: list[dict] = []  # per generation: the generation output (TRL's keys)
        self.params_at_generation: list[dict] = []
        self.grads: list[dict] = []  # per optimizer step
        self.params_at_step: list[dict] = []

    def length_reward(self, prompts, completions, **kwargs):  # 0, 0.5 or 1 by length
        out = [float(len(c) % 3) / 2 for c in completions]
        self.rewards.append([out])
        self.prompts.append(list(prompts))
        return out

    def digit_reward(self, prompts, completions, **kwargs):
        out = [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in completions]
        self.rewards[-1].append(out)
        return out


def _train(kind, path, steps, recorder, peft_config=None, **fields):
    from transformers import TrainerCallback

    from lowmem.kit import reward_dataset
    from lowmem.trainers import BNPOConfig, BNPOTrainer, GVPOConfig, GVPOTrainer

    config_cls, trainer_cls = {"gvpo": (GVPOConfig, GVPOTrainer), "bnpo": (BNPOConfig, BNPOTrainer)}[kind]
    base = dict(output_dir=str(path) + "-out", optim="sgd", learning_rate=0.05, max_grad_norm=0.0, max_steps=steps,
                per_device_train_batch_size=8, num_generations=G, max_completion_length=6, bf16=False, report_to="none",
                seed=0, save_strategy="no", disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant",
                dataloader_pin_memory=False)
    base.update(fields)
    args = config_cls(**base)

    class Grabs(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            recorder.params_at_step.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            recorder.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer = trainer_cls(model=path, reward_funcs=[recorder.length_reward, recorder.digit_reward], args=args,
                          train_dataset=reward_dataset(64, 0), callbacks=[Grabs()], peft_config=peft_config)
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        recorder.params_at_generation.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        out = generate(inputs)
        recorder.batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()})
        return out

    trainer._generate_and_score_completions = recording
    trainer.train()
    return trainer


def _sequence_logps(path, params, batch, lora=None):
    """sum_t log pi(y_t | x, y_<t) over each completion's unmasked tokens, by a fresh model at ``params``
    (with a fresh ``lora`` adapter when given: ``params`` are then the PEFT model's)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    if params is not None:
        missing = set(dict(model.named_parameters())) - set(params)
        assert not missing, sorted(missing)[:3]
        model.load_state_dict(params, strict=False)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    c = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -c - 1 : -1]
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return model, (token_logps * batch["completion_mask"]).sum(1)


def _gvpo_reference_grads(path, policy_params, ref_logps, rewards, batch, beta, lora=None):
    """GVPO's loss by its equation and the gradient it gives the policy's parameters."""
    model, logps = _sequence_logps(path, policy_params, batch, lora)
    if ref_logps is None:
        ref_logps = logps.detach()
    loss = torch.zeros(())
    groups = len(rewards) // G
    for g in range(groups):
        s = slice(g * G, (g + 1) * G)
        implicit = beta * (logps[s] - ref_logps[s])
        centred = (implicit - implicit.mean()) - (rewards[s] - rewards[s].mean())
        loss = loss + 0.5 * (centred ** 2).sum() / (G - 1)
    loss = loss / groups
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, (beta * (logps - ref_logps)).detach()


def _assert_grads_close(got, want):
    assert set(got) == set(want)
    for name in want:
        scale = want[name].abs().max().item()
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-9, f"{name}: max |grad - equation's| {err:.3g} vs max |grad| {scale:.3g}"


def _weighted(recorder, generation, weights):
    r1, r2 = (torch.tensor(r) for r in recorder.rewards[generation])
    return weights[0] * r1 + weights[1] * r2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gvpo_on_policy_gradient_is_the_equation_s(accumulation, eos_model_dir, tmp_path):
    rec = _Recorder()
    _train("gvpo", eos_model_dir, 1, rec, per_device_train_batch_size=8 // accumulation,
           gradient_accumulation_steps=accumulation, reward_weights=[1.0, 0.5], beta=0.1)
    batch = rec.batches[0]
    lengths = batch["completion_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, f"completions should differ in length to test masking: {lengths}"
    rewards = _weighted(rec, 0, (1.0, 0.5))
    loss, grads, implicit = _gvpo_reference_grads(eos_model_dir, None, None, rewards, batch, 0.1)
    # on-policy: r_i = 0 and the loss is half the unbiased within-group variance of R
    assert loss == pytest.approx(sum(0.5 * rewards[g * G:(g + 1) * G].var().item() for g in range(2)) / 2)
    _assert_grads_close(rec.grads[0], grads)


def test_gvpo_reference_model_second_step(eos_model_dir, tmp_path):
    # reference_policy="model": pi_ref is the initial model (TRL reloads it by path); at step 2 the policy has
    # moved, so the implicit rewards r_i are not zero
    rec = _Recorder()
    trainer = _train("gvpo", eos_model_dir, 2, rec, reference_policy="model", beta=0.5, learning_rate=0.5,
                     reward_weights=[1.0, 1.0])
    assert trainer.ref_model is not None
    batch = rec.batches[1]
    _, ref_logps = _sequence_logps(eos_model_dir, None, batch)
    loss, grads, implicit = _gvpo_reference_grads(eos_model_dir, rec.params_at_step[1], ref_logps.detach(),
                                                  _weighted(rec, 1, (1.0, 1.0)), batch, 0.5)
    assert implicit.abs().max() > 1e-3
    logged = [h["gvpo/loss"] for h in trainer.state.log_history if "gvpo/loss" in h]
    assert logged[1] == pytest.approx(loss, rel=1e-4)
    _assert_grads_close(rec.grads[1], grads)


def test_gvpo_reference_model_under_lora_is_the_base_model(eos_model_dir, tmp_path):
    # with peft_config, pi_ref = the base model (the adapter disabled): no copy is loaded
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    rec = _Recorder()
    trainer = _train("gvpo", eos_model_dir, 2, rec, reference_policy="model", beta=0.5, learning_rate=0.5,
                     reward_weights=[1.0, 1.0], peft_config=lora)
    assert trainer.ref_model is None
    batch = rec.batches[1]
    _, base_logps = _sequence_logps(eos_model_dir, None, batch)  # the plain base model
    loss, grads, implicit = _gvpo_reference_grads(eos_model_dir, rec.params_at_step[1], base_logps.detach(),
                                                  _weighted(rec, 1, (1.0, 1.0)), batch, 0.5, lora=lora)
    assert implicit.abs().max() > 1e-4 and all("lora_" in n for n in grads)
    _assert_grads_close(rec.grads[1], grads)


def test_gvpo_sampling_reference_off_policy_second_iteration(eos_model_dir, tmp_path):
    # num_iterations=2: step 2 trains again on step 1's completions; pi_ref = the policy that sampled them
    rec = _Recorder()
    trainer = _train("gvpo", eos_model_dir, 2, rec, num_iterations=2, beta=0.5, learning_rate=0.5,
                     reward_weights=[1.0, 1.0])
    assert len(rec.batches) == 1 and trainer.ref_model is None
    batch = rec.batches[0]
    _, sampling_logps = _sequence_logps(eos_model_dir, rec.params_at_generation[0], batch)
    loss, grads, implicit = _gvpo_reference_grads(eos_model_dir, rec.params_at_step[1], sampling_logps.detach(),
                                                  _weighted(rec, 0, (1.0, 1.0)), batch, 0.5)
    assert implicit.abs().max() > 1e-3
    _assert_grads_close(rec.grads[1], grads)


def _beta_pdf(x: float, a: float, b: float) -> float:
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    if (x == 0.0 and a > 1) or (x == 1.0 and b > 1):
        return 0.0
    xa = 0.0 if a == 1 else (a - 1) * math.log(x)
    xb = 0.0 if b == 1 else (b - 1) * math.log(1 - x)
    return math.exp(xa + xb - log_b)


def _bnpo_reference(rewards: list[float], low: float, high: float) -> list[float]:
    scaled = [(r - low) / (high - low) for r in rewards]
    p = [sum(scaled[g * G:(g + 1) * G]) / G for g in range(len(scaled) // G)]
    m = sum(p) / len(p)
    v = sum((x - m) ** 2 for x in p) / (len(p) - 1)
    if v == 0:
        alpha = beta = 1.0  # lowmem's documented choice for a batch with no spread (the paper's fit divides by v)
    else:
        c = m * (1 - m) / v - 1
        alpha, beta = max(1 + c * m / 3, 1.0), max(1 + c * (1 - m) / 3, 1.0)
    out = []
    for i, x in enumerate(scaled):
        pg = p[i // G]
        density = _beta_pdf(pg, alpha, beta)
        out.append(min(1 / density if density > 0 else math.inf, 1e6) * (x - pg))
    return out


def test_bnpo_advantages_in_training_are_the_equation_s(eos_model_dir, tmp_path):
    # 4 prompts x 4 completions, two reward functions with their own ranges: A = mean of the two BNPO advantages
    rec = _Recorder()
    trainer = _train("bnpo", eos_model_dir, 1, rec, per_device_train_batch_size=16, reward_range=[[0.0, 1.0], [-1.0, 1.0]])
    length_r, digit_r = rec.rewards[0]
    prompts = rec.prompts[0]  # a group is G contiguous rows of one prompt (TRL's sampler), 4 different prompts
    assert all(len(set(prompts[g * G:(g + 1) * G])) == 1 for g in range(4)) and len(set(prompts)) == 4
    expected = [(x + y) / 2 for x, y in zip(_bnpo_reference(length_r, 0.0, 1.0), _bnpo_reference(digit_r, -1.0, 1.0))]
    got = rec.batches[0]["advantages"]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert any(abs(a) > 0 for a in expected)
    assert "bnpo/alpha" in trainer.state.log_history[0] and "bnpo/beta" in trainer.state.log_history[0]
