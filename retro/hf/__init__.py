"""Hugging Face side: source architectures, layer surgery, safetensors weights."""
