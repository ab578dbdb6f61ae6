"""Qwen2Config: both transformers spellings, derived layer types, presets, round trip, errors."""

import json

import pytest

from qwen2_jax.config import ConfigError, Qwen2Config, RopeScaling, preset


def test_presets_hold_the_official_values():
    assert preset("qwen2-7b").vocab_size == 152064
    assert preset("qwen2-72b").vocab_size == 152064
    assert preset("qwen2-0.5b").vocab_size == 151936
    assert preset("qwen2-72b").rms_norm_eps == 1e-5
    assert preset("qwen2-72b-instruct").rms_norm_eps == 1e-6
    assert preset("qwen2-0.5b").tie_word_embeddings and preset("qwen2-1.5b-instruct").tie_word_embeddings
    assert not preset("qwen2-7b").tie_word_embeddings
    assert preset("qwen2-0.5b").head_size == 64 and preset("qwen2-1.5b").head_size == 128
    assert preset("qwen2-7b-instruct").checkpoint_info.eos_token_ids == (151645,)
    for name in ("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b"):
        for variant in ("", "-instruct"):
            cfg = preset(name + variant)
            assert cfg.rope_theta == 1e6 and not cfg.use_sliding_window
            assert set(cfg.layer_types) == {"full_attention"}
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("qwen2-3b")


def test_v4_and_v5_rope_spellings_agree():
    base = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
    }
    v4_type = {
        **base,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    v4_rope_type = {
        **base,
        "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    v5 = {
        **base,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    }
    configs = [Qwen2Config.from_hf(d) for d in (v4_type, v4_rope_type, v5)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope_scaling == RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32768)
    assert configs[0].rope_theta == 1e6
    plain = Qwen2Config.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain.rope_theta == 5e5 and plain.rope_scaling.rope_type == "default"


@pytest.mark.parametrize("use_sw,window,max_window_layers", [(True, 8, 2), (True, 8, 0), (False, 8, 2)])
def test_layer_types_follow_transformers(use_sw, window, max_window_layers):
    from transformers import Qwen2Config as HFConfig

    hf = HFConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=5,
        intermediate_size=96,
        vocab_size=100,
        use_sliding_window=use_sw,
        sliding_window=window,
        max_window_layers=max_window_layers,
    )
    d = hf.to_dict()
    d.pop("layer_types")  # as a < 4.53 config.json: derived with the >= 4.56 rule
    ours = Qwen2Config.from_hf(d)
    assert list(ours.layer_types) == list(hf.layer_types)
    assert ours.sliding_window == hf.sliding_window


def test_to_hf_loads_back_into_an_equal_transformers_config(tmp_path):
    from transformers import AutoConfig

    for name in ("qwen2-0.5b", "qwen2-72b-instruct"):
        ours = preset(name).replace(
            rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32768)
        )
        ours.save_hf(tmp_path)
        hf = AutoConfig.from_pretrained(tmp_path)
        assert hf.model_type == "qwen2" and hf.hidden_size == ours.hidden_size
        assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
        assert hf.rms_norm_eps == ours.rms_norm_eps and hf.tie_word_embeddings == ours.tie_word_embeddings
        hf.save_pretrained(tmp_path / "again")
        assert Qwen2Config.from_hf(tmp_path / "again") == ours


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 66}, "not divisible by num_attention_heads"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "unsupported rope type 'longrope'"),
        ({"rope_scaling": {"type": "linear"}}, "needs factor"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"use_sliding_window": True, "sliding_window": None}, "sliding_window"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(change, message):
    d = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        **change,
    }
    with pytest.raises(ConfigError, match=message):
        Qwen2Config.from_hf(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen2Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match="config.json: unsupported model_type 'mistral'"):
        Qwen2Config.from_hf(tmp_path)


def test_config_is_hashable_for_jit():
    assert hash(preset("qwen2-0.5b")) == hash(preset("qwen2-0.5b"))
