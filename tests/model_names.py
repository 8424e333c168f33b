"""File names the test server and the saved workflows share."""

# The file names of the real model, and of the style LoRAs the saved workflows expect: the
# test server holds the tiny model and tiny LoRAs under these names.
MODEL = "z_image_turbo_bf16.safetensors"
TEXT_ENCODER = "qwen_3_4b.safetensors"
VAE = "ae.safetensors"
STYLE_LORAS = {
    "sugar": "sugar_face_zimage_turbo.safetensors",
    "niannian": "meixiong_niannian_turbo_lora.safetensors",
    "sun_zhenni": "sun_zhenni_zimage_turbo_lora.safetensors",
}
