"""EntropyRegularizedTrainer on tiny stock causal LMs (GPT-2, GPT-NeoX, Llama) and on EntropyGPTForCausalLM.

Covers: the training loss is CE + loss_coeff * L_ent, checked against the released-code formula. The
thresholds get gradients, change and get no weight decay, and eval_loss is pure CE. Padded query rows are
left out of L_ent, and gradient accumulation keeps the loss scale. Entropy metrics land in the Trainer's
log and in an MLflow run (SQLite store). Also: the threshold save/load round trip, and the errors for
models without attention probabilities.
CPU only, random token data, no downloads; about 40 s on 2 CPU cores.
Run: .venv/bin/pytest tests/integration/test_trainer_integration.py
"""


import pytest
import torch
import torch.nn as nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import CausalLMOutput

from harness.entropy import (
    EntropyRegularization,
    attention_entropy,
    entropy_regularization_loss,
)
from harness.integrations import (
    EntropyRegularizedTrainer,
    entropy_thresholds,
    load_entropy_thresholds,
)
from harness.modeling import EntropyGPTConfig, EntropyGPTForCausalLM

pytestmark = pytest.mark.integration

VOCAB, T, N_LAYER, N_HEAD, BATCH = 64, 16, 2, 4, 4


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences whose labels are the inputs (the model shifts them)."""

    def __init__(self, n: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, T), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_stock(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=N_LAYER, n_head=N_HEAD,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    if kind == "neox":
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                               intermediate_size=64, max_position_embeddings=T, bos_token_id=0, eos_token_id=0)
        return GPTNeoXForCausalLM(config)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=T,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=4, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, learning_rate=1e-2, logging_steps=2, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def first_batch(dataset) -> dict:
    return {key: torch.stack([dataset[i][key] for i in range(BATCH)]) for key in ("input_ids", "labels")}


def plain_eval_loss(model, trainer) -> float:
    """Return eval_loss of a stock Trainer on the same model and data.

    The stock Trainer is the reference because in transformers 5.25 it divides GPT-2's summed CE by all
    label positions (T per row, not T - 1), so eval_loss is not the model's own mean CE there.
    """
    return Trainer(model=model, args=trainer.args, eval_dataset=trainer.eval_dataset).evaluate()["eval_loss"]


def eager_attentions(model, batch):
    """Return the attention probabilities of an eager forward in training mode."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    outputs = model(**batch, output_attentions=True)
    model.set_attn_implementation(previous)
    return outputs.attentions


# -----------------------------------------------------------------------------
# Stock models

@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_stock_model_loss_and_training(tmp_path, kind):
    model = tiny_stock(kind)
    data = RandomTokens(32)
    coeff = 1e-2
    trainer = EntropyRegularizedTrainer(
        model=model, args=training_args(tmp_path), train_dataset=data, eval_dataset=RandomTokens(BATCH, seed=1),
        loss_coeff=coeff, tolerance_margin_factor=0.2,
    )
    batch = first_batch(data)
    model.train()

    # the training loss is CE + lambda * L_ent, with L_ent as the released class computes it
    total = trainer.compute_loss(model, batch)
    with torch.no_grad():
        ce = model(**batch).loss
        attentions = eager_attentions(model, batch)
    thresholds = entropy_thresholds(model)
    expected = EntropyRegularization(coeff, 0.2, T).compute_loss(attentions, thresholds, N_HEAD, N_LAYER)
    assert expected > 0
    assert torch.allclose(total.detach() - ce, expected, rtol=1e-4, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"

    # every threshold gets a finite, nonzero gradient
    total.backward()
    for module in (m for m in model.modules() if hasattr(m, "reg_threshold_weights")):
        grad = module.reg_threshold_weights.grad
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
    model.zero_grad()

    # training moves the thresholds and logs the entropy statistics next to the loss
    before = entropy_thresholds(model).clone()
    trainer.train()
    assert not torch.allclose(entropy_thresholds(model), before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["entropy/loss"] > 0
        assert "entropy/mean" in entry
        assert "entropy/overload_fraction" in entry
        assert f"attn.{N_LAYER - 1}.head.{N_HEAD - 1}.entropy" in entry

    # evaluation gives the stock Trainer's CE, on the default attention path
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain_eval_loss(model, trainer), rel=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_thresholds_without_weight_decay(tmp_path):
    model = tiny_stock("gpt2")
    trainer = EntropyRegularizedTrainer(model=model, args=training_args(tmp_path, weight_decay=0.1),
                                        train_dataset=RandomTokens(8))
    decay_names = trainer.get_decay_parameter_names(model)
    assert not any("reg_threshold_weights" in name for name in decay_names)
    assert "transformer.h.0.attn.c_attn.weight" in decay_names

    # the Trainer's optimizer has every threshold in its zero-decay group
    optimizer = trainer.create_optimizer()
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for layer in model.transformer.h:
        assert id(layer.attn.reg_threshold_weights) in no_decay


def test_model_init_gets_thresholds(tmp_path):
    trainer = EntropyRegularizedTrainer(model_init=lambda: tiny_stock("llama"), args=training_args(tmp_path),
                                        train_dataset=RandomTokens(8))
    assert entropy_thresholds(trainer.model).shape == (N_LAYER, N_HEAD)


def test_entropy_log_steps_force_a_log(tmp_path):
    model = tiny_stock("gpt2")
    args = training_args(tmp_path, max_steps=4, logging_steps=2)
    trainer = EntropyRegularizedTrainer(model=model, args=args, train_dataset=RandomTokens(32), entropy_log_steps=3)
    trainer.train()
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(logs) == [2, 3, 4]
    assert "attn.0.head.0.entropy" in logs[3]
    assert "attn.0.head.0.entropy" not in logs[2]
    assert all("entropy/loss" in entry for entry in logs.values())


def test_monitoring_only_keeps_ce(tmp_path):
    model = tiny_stock("llama")
    data = RandomTokens(8)
    trainer = EntropyRegularizedTrainer(model=model, args=training_args(tmp_path, logging_steps=5),
                                        train_dataset=data, loss_coeff=0.0)
    batch = first_batch(data)
    model.train()

    # step 1 is no logging step: one SDPA forward, plain CE
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch)
    assert trainer._pending_metrics is None
    assert trainer._entropy_loss_count == 0
    with torch.no_grad():
        assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)

    # step 5 logs: entropy is measured but not added
    trainer.state.global_step = 4
    loss = trainer.compute_loss(model, batch)
    assert trainer._pending_metrics is not None
    with torch.no_grad():
        assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "entropy_gpt"])
def test_gradient_accumulation_scaling(tmp_path, kind):
    # head_mean does not grow with the batch, so one batch of 8 and two micro-batches of 4 must agree
    logs = []
    for accumulation in (1, 2):
        if kind == "entropy_gpt":
            torch.manual_seed(0)
            config = EntropyGPTConfig(vocab_size=VOCAB, n_positions=T, n_layer=N_LAYER, n_head=N_HEAD, n_embd=32,
                                      entropy_reduction="head_mean", entropy_threshold_init=0.1)
            model = EntropyGPTForCausalLM(config)
        else:
            model = tiny_stock(kind)
        args = training_args(tmp_path, max_steps=1, logging_steps=1, per_device_train_batch_size=8 // accumulation,
                             gradient_accumulation_steps=accumulation, max_grad_norm=1e9)
        trainer = EntropyRegularizedTrainer(model=model, args=args, train_dataset=RandomTokens(8), loss_coeff=1.0,
                                            reduction="head_mean", threshold_init=0.1)
        trainer.train()
        logs.append(trainer.state.log_history[0])
    assert logs[0]["entropy/loss"] > 0
    for key in ("loss", "grad_norm", "entropy/loss"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-4), key


def test_padded_rows_excluded(tmp_path):
    model = tiny_stock("gpt2")
    trainer = EntropyRegularizedTrainer(model=model, args=training_args(tmp_path), train_dataset=RandomTokens(8),
                                        loss_coeff=1.0)
    ids = RandomTokens(2).ids
    valid = 10
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, valid:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model.train()
    total = trainer.compute_loss(model, batch)
    with torch.no_grad():
        ce = model(**batch).loss

        # row_sum is a sum over rows, so L_ent is the full first sequence plus the valid prefix of the second
        rows = [attention_entropy(a) for a in eager_attentions(model, batch)]
        theta = entropy_thresholds(model)
        full = entropy_regularization_loss([r[:1] for r in rows], theta, T)
        prefix = entropy_regularization_loss([r[1:, :, :valid] for r in rows], theta, T)
    assert torch.allclose(total.detach() - ce, full + prefix, rtol=1e-4)


# -----------------------------------------------------------------------------
# The harness model family

def test_entropy_gpt_family(tmp_path):
    torch.manual_seed(0)
    config = EntropyGPTConfig(vocab_size=VOCAB, n_positions=T, n_layer=N_LAYER, n_head=N_HEAD, n_embd=32)
    model = EntropyGPTForCausalLM(config)
    data = RandomTokens(32)
    trainer = EntropyRegularizedTrainer(model=model, args=training_args(tmp_path), train_dataset=data,
                                        eval_dataset=RandomTokens(BATCH, seed=1), loss_coeff=1e-2)
    batch = first_batch(data)
    model.train()
    total = trainer.compute_loss(model, batch)
    with torch.no_grad():
        outputs = model(**batch, return_entropy=True)
    assert torch.allclose(total.detach(), outputs.loss + 1e-2 * outputs.entropy_loss, rtol=1e-5)
    names = [name for name, _ in model.named_parameters() if name.endswith("reg_threshold_weights")]
    assert len(names) == N_LAYER

    # training moves the model's own thresholds, and eval_loss is the CE alone
    before = model.entropy_thresholds().clone()
    trainer.train()
    assert not torch.allclose(model.entropy_thresholds(), before)
    assert "entropy/mean" in trainer.state.log_history[0]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain_eval_loss(model, trainer), rel=1e-6)


def test_entropy_gpt_config_mismatch(tmp_path):
    model = EntropyGPTForCausalLM(EntropyGPTConfig(vocab_size=VOCAB, n_positions=T, n_layer=1, n_head=2, n_embd=16,
                                                   entropy_reduction="head_mean"))
    with pytest.raises(ValueError, match="reduction='row_sum' but config.entropy_reduction='head_mean'"):
        EntropyRegularizedTrainer(model=model, args=training_args(tmp_path), train_dataset=RandomTokens(8))


# -----------------------------------------------------------------------------
# Tracking and checkpoints

def test_mlflow_run_has_entropy_metrics(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("trainer-test", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trainer-test")
    mlflow.set_tracking_uri(uri)

    model = tiny_stock("neox")
    args = training_args(tmp_path, report_to="mlflow", run_name="entropy-trainer")
    EntropyRegularizedTrainer(model=model, args=args, train_dataset=RandomTokens(32)).train()
    mlflow.flush_async_logging()

    # the run contains the entropy metrics at the steps of the training loss
    experiment = client.get_experiment_by_name("trainer-test")
    (run,) = client.search_runs([experiment.experiment_id])
    for key in ("loss", "entropy/loss", "entropy/mean", "entropy/layer_1", "entropy/bin_3", "attn.1.head.3.entropy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [2, 4], key


def test_thresholds_round_trip(tmp_path):
    model = tiny_stock("gpt2")
    args = training_args(tmp_path, save_strategy="steps", save_steps=4)
    trainer = EntropyRegularizedTrainer(model=model, args=args, train_dataset=RandomTokens(32))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    trained = entropy_thresholds(model)

    # the Trainer's checkpoint contains them too, so resume_from_checkpoint restores them
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert torch.equal(load_entropy_thresholds(tiny_stock("gpt2"), checkpoint), trained)

    # a stock from_pretrained drops the threshold keys, and load_entropy_thresholds restores them
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"))
    assert not hasattr(loaded.transformer.h[0].attn, "reg_threshold_weights")
    restored = load_entropy_thresholds(loaded, tmp_path / "saved")
    assert torch.equal(restored, trained)
    assert torch.equal(loaded.transformer.h[1].attn.reg_threshold_weights.detach(), trained[1])

    # a checkpoint without thresholds is rejected by name
    GPT2LMHeadModel(loaded.config).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="has no entropy thresholds"):
        load_entropy_thresholds(GPT2LMHeadModel(loaded.config), tmp_path / "plain")


# -----------------------------------------------------------------------------
# Models without attention probabilities

class NoProbsConfig(PretrainedConfig):
    model_type = "no_probs_test"

    def __init__(self, vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        super().__init__(**kwargs)


class NoProbsAttention(nn.Module):
    """Fused attention that never materializes probabilities, as many custom models do."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, L, hs)
        return y.transpose(1, 2).reshape(B, L, C)


class NoProbsForCausalLM(PreTrainedModel):
    config_class = NoProbsConfig

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = NoProbsAttention(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, labels=None, output_attentions=None, **kwargs):
        logits = self.lm_head(self.attn(self.wte(input_ids)))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


def test_model_without_probabilities(tmp_path):
    model = NoProbsForCausalLM(NoProbsConfig())
    data = RandomTokens(8)
    trainer = EntropyRegularizedTrainer(model=model, args=training_args(tmp_path), train_dataset=data)
    model.train()
    with pytest.raises(ValueError, match="NoProbsForCausalLM returned no attention probabilities"):
        trainer.compute_loss(model, first_batch(data))


def test_model_without_attention(tmp_path):
    model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError, match="MambaForCausalLM has no attention modules"):
        EntropyRegularizedTrainer(model=model, args=training_args(tmp_path), train_dataset=RandomTokens(8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "sum"}, "invalid reduction 'sum'"),
        ({"max_entropy": "log"}, "invalid max_entropy='log'"),
        ({"loss_coeff": -1.0}, "invalid loss coefficient"),
        ({"entropy_log_steps": 0}, "invalid entropy_log_steps=0"),
        ({"threshold_init": -0.1}, "invalid threshold_init=-0.1"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntropyRegularizedTrainer(model=tiny_stock("gpt2"), args=training_args(tmp_path),
                                  train_dataset=RandomTokens(8), **kwargs)
