"""Files: the safetensors reader, checkpoint key formats, model loading, the file checker, image files."""
