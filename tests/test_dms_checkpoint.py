"""Save/load round trips: our layout and NVIDIA's (both decision modes), and the training state."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model

from dms_core.config import DmsConfig
from pipeline.dms.checkpoint import load_dms_model, load_training_state, save_dms_model, save_training_state
from pipeline.dms.patch import dms_mode, patch_model

SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=8, vocab_size=50,
             tie_word_embeddings=False, initializer_range=0.02)


def tiny(seed=0):
    return tiny_model("qwen3", seed=seed, **SHAPE)


def ids(t=24, seed=0):
    return torch.randint(0, 50, (2, t), generator=torch.Generator().manual_seed(seed))


def _hard_logits(model, x):
    with dms_mode(model, "hard"):
        return model(x, use_cache=False).logits


@pytest.mark.parametrize("separate", [True, False])
def test_save_load_round_trip_reproduces_logits(tmp_path, separate):
    model = patch_model(tiny(), DmsConfig(window_size=3, separate_alpha=separate))
    if separate:
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.dms_proj_alpha.weight, std=0.1)
    x = ids()
    want = _hard_logits(model, x)
    save_dms_model(model, tmp_path, target_cr=4)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(DmsConfig().to_hf_config()) <= set(config)
    assert (
        config["dms_window_size"] == 3 and config["dms_separate_alpha"] is separate and config["dms_cr"] == 4
    )
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_dms_model(tmp_path)
    torch.testing.assert_close(_hard_logits(loaded, x), want)
    if separate:
        from safetensors.torch import load_file

        names = load_file(tmp_path / "model.safetensors")
        assert names["model.layers.1.self_attn.dms_proj_alpha.weight"].shape == (2, 32)
        assert "model.layers.1.self_attn.dms_proj_alpha_norm.weight" in names


@pytest.mark.parametrize("separate", [True, False])
def test_nvidia_layout_config_loads_without_remote_code(tmp_path, separate):
    model = patch_model(tiny(), DmsConfig(window_size=3, separate_alpha=separate))
    if separate:
        torch.nn.init.normal_(model.model.layers[0].self_attn.dms_proj_alpha.weight, std=0.1)
    save_dms_model(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(
        model_type="qwen3_dms",
        architectures=["Qwen3DMSForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3DMSForCausalLM"},
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = load_dms_model(tmp_path)
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.dms_settings.separate_alpha is separate
    torch.testing.assert_close(_hard_logits(loaded, ids()), _hard_logits(model, ids()))


def test_adapter_checkpoint_missing_adapter_weights_is_an_error(tmp_path):
    model = tiny()
    model.config.dms_separate_alpha = True
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter weights are missing"):
        load_dms_model(tmp_path)


def test_training_state_round_trip(tmp_path):
    model = patch_model(tiny(), DmsConfig(window_size=3, separate_alpha=True))
    names = [n for n, _ in model.named_parameters() if "dms_proj_alpha" in n]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)  # as train_dms does: only the trained weights are saved
    params = [p for n, p in model.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    save_training_state(tmp_path / "state", model, opt, {"step": 7, "saved": {}})
    assert sorted(load_file(tmp_path / "state" / "trainable.safetensors")) == sorted(names)
    fresh = patch_model(tiny(), DmsConfig(window_size=3, separate_alpha=True))
    for n, p in fresh.named_parameters():
        p.requires_grad_(n in names)
    fresh_params = [p for n, p in fresh.named_parameters() if n in names]
    opt2 = torch.optim.AdamW(fresh_params, lr=0.1)
    meta = load_training_state(tmp_path / "state", fresh, opt2)
    assert meta["step"] == 7
    torch.testing.assert_close(fresh_params[0], params[0])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
