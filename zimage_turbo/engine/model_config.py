"""Architecture configurations: the real Z-Image-Turbo and the tiny test model.

The tiny model uses the very same classes with small sizes, so every code path
(key conversion, LoRA targeting, sampling, fp16 guards) is exercised on a CPU.
"""

# Real Z-Image-Turbo (see REFERENCE.md). axes_lens differs from diffusers' default.
TRANSFORMER_CONFIG = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}

TEXT_ENCODER_CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
    "attention_bias": False,
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


# The pipeline reads hidden_states[-2] of the text encoder: the last decoder layer
# and the final norm never influence the result, so they are not loaded at all.
TEXT_ENCODER_HIDDEN_LAYER_FROM_END = 2

CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
# The same template in Jinja, for tokenizer_config.json (diffusers' pipeline applies it).
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_PROMPT_TOKENS = 512
LATENT_CHANNELS = 16
VAE_SCALE = 8  # pixels per latent cell
SIZE_MULTIPLE = 16  # VAE scale 8 x transformer patch 2
